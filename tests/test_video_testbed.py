"""The embedded video model's data, pipeline and evaluator (issue 25): clips of real Fashion-MNIST images moved by
known motions, the motion recovered from frames, Wan's pipeline in pixel space, and scores that separate real
clips from broken ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from postdiff.testbed.data import load_split, to_model_range
from postdiff.testbed.text import write_tokenizer_files
from postdiff.testbed.video_data import MOTION_WORDS, MOTIONS, NUM_FRAMES, move, recover_motion, video_caption
from postdiff.testbed.video_evaluator import VideoEvaluator, real_clip_scores, real_clips
from postdiff.testbed.video_model import TestbedVideoPipeline, build_video_pipeline

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, ffn_dim=16, freq_dim=16)


def test_clips_move_real_images_and_their_motion_is_recovered_even_under_noise():
    images, _ = load_split("test")
    x = to_model_range(images[:80])
    motions = torch.arange(80) % len(MOTIONS)
    clips = move(x, motions)
    assert clips.shape == (80, 1, NUM_FRAMES, 32, 32) and clips.min() >= -1 and clips.max() <= 1
    assert torch.equal(clips[motions != 4, :, 0], x[motions != 4])  # every motion but zooming in starts at the image
    assert torch.equal(recover_motion(clips), motions)
    noisy = (clips + 0.3 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (recover_motion(noisy) == motions).float().mean() >= 0.95


def test_captions_name_class_and_motion_in_words_the_tokenizer_knows_as_one_token(tmp_path):
    import random

    from transformers import CLIPTokenizer

    caption = video_caption(7, 2, random.Random(1))
    assert caption.endswith("moving up") and any(name in caption for name in ("sneaker", "trainer"))
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path / "video", extra_words=MOTION_WORDS))
    for word in MOTION_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    image_vocab = json.loads((write_tokenizer_files(tmp_path / "image") / "vocab.json").read_text())
    video_vocab = json.loads((tmp_path / "video" / "vocab.json").read_text())
    assert {token: video_vocab[token] for token in image_vocab} == image_vocab  # the image models' ids unchanged


def test_the_pixel_space_wan_pipeline_makes_exactly_the_frames_asked_and_reloads(tmp_path):
    pipe = build_video_pipeline(tmp_path / "tokenizer", **TINY)
    assert isinstance(pipe, TestbedVideoPipeline)
    call = dict(prompt="a bag zooming in", height=32, width=32, num_inference_steps=2, guidance_scale=3.0)
    for frames in (4, 8, 9):
        latents = pipe(**call, num_frames=frames, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
        assert latents.shape == (1, 1, frames, 32, 32)
    video = pipe(**call, num_frames=8, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 8, 32, 32, 1) and video.dtype == np.float32
    pipe.save_pretrained(tmp_path / "saved")
    again = TestbedVideoPipeline.from_pretrained(tmp_path / "saved")
    reloaded = again(**call, num_frames=8, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(reloaded, video)


@pytest.fixture(scope="module")
def video_evaluator():
    return VideoEvaluator(reference_clips=400)


def test_the_evaluator_scores_real_clips_near_their_ceiling_and_separates_broken_ones(video_evaluator):
    real = real_clip_scores(video_evaluator, count=200)
    assert real.motion_accuracy == 1.0 and real.class_accuracy > 0.6 and real.frame_fd < 3
    assert 0.85 < real.temporal_ratio < 1.15
    clips, labels, motions = real_clips(200, seed=2)
    frozen = video_evaluator.score(clips[:, :, :1].expand_as(clips).contiguous(), labels, motions)
    assert frozen.temporal_ratio == 0 and frozen.motion_accuracy < 0.3
    noise = torch.rand(clips.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    broken = video_evaluator.score(noise, labels, motions)
    assert broken.frame_fd > 20 * real.frame_fd and broken.class_accuracy < 0.3
    shuffled = video_evaluator.score(clips[:, :, torch.randperm(NUM_FRAMES, generator=torch.Generator().manual_seed(0))],
                                     labels, motions)
    assert shuffled.temporal_ratio > real.temporal_ratio and shuffled.motion_accuracy < 0.5


def test_the_evaluator_refuses_mismatched_labels(video_evaluator):
    clips, labels, motions = real_clips(4)
    with pytest.raises(ValueError, match="4 clips but 3 labels"):
        video_evaluator.score(clips, labels[:3], motions)



def _scores(pipe, workload, indices, config=None):
    """MovingFashion scores of one clip per prompt (12 steps, guidance 4, seeds 0 + index), under `config`."""
    import postdiff

    with postdiff.api.applied(pipe, config or postdiff.PostDiffConfig()):
        clips, prompt_indices = workload.generate(pipe, indices, 1, 12, 4.0, 0)
    return workload.score(clips, prompt_indices)


def test_the_shipped_video_model_loads_offline_beats_the_untrained_one_and_keeps_its_quality_under_the_paper_preset(
        video_evaluator, tmp_path):
    """The trained weights: under 20 MB, `testbed-video` loads them offline; on 16 class x motion prompts the
    trained model's frames are far nearer real frames (FD), of the prompted class and with the prompted motion
    (chance: 1/8) than the untrained model's; and the paper preset stays within the stated margin of its own
    baseline: FD at most 25% higher, class and motion accuracy at most 0.15 lower."""
    import postdiff
    from postdiff.evaluation.workloads import MovingFashion
    from postdiff.loading import load_pipeline
    from postdiff.testbed.video_model import VIDEO_WEIGHTS_DIR

    files = [path for path in VIDEO_WEIGHTS_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 20 * 2**20
    assert {"model_index.json", "diffusion_pytorch_model.safetensors", "training_record.json"} <= {p.name for p in files}
    pipe, _ = load_pipeline("testbed-video")
    assert isinstance(pipe, TestbedVideoPipeline)
    pipe.set_progress_bar_config(disable=True)
    untrained = build_video_pipeline(tmp_path / "tokenizer")
    untrained.set_progress_bar_config(disable=True)
    workload = MovingFashion(video_evaluator)
    indices = list(range(0, 80, 5))  # 16 prompts: every class, every motion twice
    trained, fresh = _scores(pipe, workload, indices), _scores(untrained, workload, indices)
    assert trained["fd"] * 3 < fresh["fd"]
    assert trained["alignment"] >= 0.3 and trained["alignment"] > fresh["alignment"] + 0.2
    assert trained["motion"] >= 0.4
    paper = _scores(pipe, workload, indices, postdiff.PostDiffConfig.preset("paper", family=postdiff.api.preset_family(pipe)))
    assert paper["fd"] <= 1.25 * trained["fd"]
    assert paper["alignment"] >= trained["alignment"] - 0.15 and paper["motion"] >= trained["motion"] - 0.15


def test_generate_writes_the_shipped_video_models_clips_as_gifs(tmp_path):
    """`postdiff generate --model testbed-video`: one GIF of 8 frames a clip for the baseline and PostDiff."""
    from PIL import Image
    from typer.testing import CliRunner

    from postdiff.cli import app

    result = CliRunner().invoke(app, ["generate", "a photo of a bag moving left", "--model", "testbed-video",
                                      "--num-images", "1", "--steps", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for run in ("baseline", "postdiff"):
        with Image.open(tmp_path / f"{run}_000.gif") as clip:
            assert clip.n_frames == NUM_FRAMES and clip.size == (32, 32)
