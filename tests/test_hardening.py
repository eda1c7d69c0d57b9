"""The contract around the loop: x0 at every step for every scheduler, interrupts, callback outputs, planning
without side effects, apply/remove leaving nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    TCDScheduler,
)
from recorder import UNetRecorder
from tiny import SCHEDULERS, SD_SCHEDULER, call, hook_leftovers, make_scheduler, sd_pipeline, sdxl_pipeline

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.caching import cross_attention

MIXED = PostDiffConfig(beta=0.5, switch=0.5)


MORE_SCHEDULERS = {"ddpm": DDPMScheduler, "lms": LMSDiscreteScheduler, "deis": DEISMultistepScheduler, "tcd": TCDScheduler}


class SubclassedEuler(EulerDiscreteScheduler):
    """A user's scheduler subclass: traits are matched with isinstance."""


def _scheduler(name: str):
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config({**SD_SCHEDULER, "use_karras_sigmas": True})
    if name == "lcm":
        return LCMScheduler.from_config(SD_SCHEDULER)
    if name == "subclassed_euler":
        return SubclassedEuler.from_config(SD_SCHEDULER)
    if name in MORE_SCHEDULERS:
        return MORE_SCHEDULERS[name].from_config(SD_SCHEDULER)
    if name.endswith("_v"):
        return make_scheduler(name[:-2], prediction_type="v_prediction")
    return make_scheduler(name)


def _pre_step_index(scheduler, t) -> int | None:
    """The index a step starts from, as diffusers' `_init_step_index` finds it (None: no step index)."""
    if not hasattr(scheduler, "step_index"):
        return None
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    return scheduler.index_for_timestep(t)


def _independent_x0(scheduler, index, sample, model_output, t, output) -> torch.Tensor:
    """The scheduler's own x0 where its step returns one; else the closed form at the pre-step noise level."""
    if len(output) > 1 and not isinstance(scheduler, TCDScheduler):  # TCD's second output is no x0
        return output[1]
    kind = scheduler.config.prediction_type
    if index is not None and hasattr(scheduler, "sigmas"):  # DPM-Solver, UniPC: sigma = sqrt((1 - a) / a) from their own (maybe Karras) table
        sigma = scheduler.sigmas[index]
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        sigma_t = sigma * alpha_t
    else:  # PNDM, TCD
        alpha_t = scheduler.alphas_cumprod[int(t)] ** 0.5
        sigma_t = (1 - scheduler.alphas_cumprod[int(t)]) ** 0.5
    if kind == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    return alpha_t * sample - sigma_t * model_output


X0_SCHEDULERS = [*SCHEDULERS, *MORE_SCHEDULERS, "dpmpp_2m_karras", "lcm", "subclassed_euler", "euler_v", "dpmpp_2m_v", "ddim_v"]


@pytest.mark.parametrize("name", X0_SCHEDULERS)
def test_x0_of_every_step_equals_an_independent_computation(model_dir, monkeypatch, name):
    pipe = sd_pipeline(model_dir)
    pipe.scheduler = _scheduler(name)
    expected = []
    scheduler_class = type(pipe.scheduler)
    original_step = scheduler_class.step

    def recording_step(self, model_output, timestep, sample, *args, **kwargs):
        index = _pre_step_index(self, timestep)
        output = original_step(self, model_output, timestep, sample, *args, **{**kwargs, "return_dict": False})
        expected.append(_independent_x0(self, index, sample, model_output, timestep, output))
        return output

    monkeypatch.setattr(scheduler_class, "step", recording_step)
    postdiff.apply(pipe, MIXED)
    arguments = dict(prompt="a photo of a sneaker", negative_prompt="", num_inference_steps=8, guidance_scale=5.0,
                     height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    _, traced = postdiff.trace_x0(pipe, **arguments)
    plan = postdiff.plan_call(pipe, **arguments)
    assert len(traced) == len(expected) == len(plan)
    assert [tuple(x0.shape[-2:]) for x0 in traced] == [step.latent_hw for step in plan.steps]
    for step, ours, theirs in zip(plan.steps, traced, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"step {step.index}")


def _interrupt_at(index: int):
    def callback(pipeline, step, t, tensors):
        if step == index:
            pipeline._interrupt = True
        return tensors

    return callback


def test_interrupt_with_off_is_bit_identical_to_diffusers(model_dir):
    pipe = sd_pipeline(model_dir, scheduler="euler")
    baseline = call(pipe, callback_on_step_end=_interrupt_at(2))
    postdiff.apply(pipe, PostDiffConfig())
    assert np.array_equal(call(pipe, callback_on_step_end=_interrupt_at(2)), baseline)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_interrupt_in_the_low_resolution_phase_stops_and_decodes_at_full_size(model_dir, family):
    pipe = postdiff.apply((sd_pipeline if family == "sd" else sdxl_pipeline)(model_dir), MIXED)
    recorder = UNetRecorder(pipe.unet)
    image = call(pipe, callback_on_step_end=_interrupt_at(1))
    recorder.remove()
    assert len(recorder.calls) == 2  # steps 0 and 1 ran, then the loop stopped
    assert image.shape == call(pipe).shape == (1, 32, 32, 3)
    assert np.array_equal(call(pipe), call(postdiff.apply(pipe, MIXED)))  # the flag does not stick to later calls


def _scaled_embeddings(names: tuple[str, ...]):
    def callback(pipeline, step, t, tensors):
        if step == 3:
            return {**tensors, **{name: tensors[name] * 0.5 for name in names if tensors[name] is not None}}
        return tensors

    return callback


@pytest.mark.parametrize("family, names", [
    ("sd", ("prompt_embeds",)),
    ("sd", ("prompt_embeds", "negative_prompt_embeds")),
    ("sdxl", ("prompt_embeds", "add_text_embeds", "add_time_ids")),
])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_callback_outputs_with_off_are_bit_identical_to_diffusers(model_dir, family, names, guidance_scale):
    pipe = (sd_pipeline if family == "sd" else sdxl_pipeline)(model_dir)
    arguments = dict(callback_on_step_end=_scaled_embeddings(names), callback_on_step_end_tensor_inputs=["latents", *names],
                     guidance_scale=guidance_scale)
    baseline = call(pipe, **arguments)
    assert not np.array_equal(baseline, call(pipe, guidance_scale=guidance_scale))  # the callback matters
    postdiff.apply(pipe, PostDiffConfig())
    assert np.array_equal(call(pipe, **arguments), baseline)


def test_callback_embeddings_reach_the_steps_after_the_cfg_stop(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir), PostDiffConfig(cfg_stop=5, ca_mode="none"))
    seen = []
    attention = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2  # sees what really runs
    handle = attention.register_forward_pre_hook(lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    call(pipe, callback_on_step_end=_scaled_embeddings(("prompt_embeds",)), callback_on_step_end_tensor_inputs=["prompt_embeds"])
    handle.remove()
    torch.testing.assert_close(seen[4], seen[3] * 0.5)
    torch.testing.assert_close(seen[5], seen[4][1:])  # the conditional half of what the callback returned


def test_plan_call_touches_neither_the_scheduler_nor_the_pipeline(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir, scheduler="dpmpp_2m"), MIXED)
    pipe.scheduler.set_timesteps(3)
    timesteps, fields = pipe.scheduler.timesteps.clone(), dict(pipe.__dict__)
    plan = postdiff.plan_call(pipe, "a bag", num_inference_steps=8, guidance_scale=9.0, height=32, width=32)
    assert len(plan) == 8
    assert pipe.scheduler.num_inference_steps == 3 and torch.equal(pipe.scheduler.timesteps, timesteps)
    assert pipe.__dict__.keys() == fields.keys() and all(pipe.__dict__[k] is v for k, v in fields.items())


def test_remove_leaves_no_hook_no_swapped_class_and_no_instance_forward(model_dir):
    pipe = sd_pipeline(model_dir)
    assert hook_leftovers(pipe.unet) == []
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cfg_stop=4))
    assert hook_leftovers(pipe.unet)
    postdiff.remove(pipe)
    assert hook_leftovers(pipe.unet) == []


def test_a_forward_set_on_the_instance_before_apply_runs_inside_the_hooks_and_is_put_back(model_dir):
    """accelerate's offload hooks (and packages' leftovers) set `forward` on the instance, which would shadow
    the hooked class's forward: it runs innermost, only when the module runs, and is restored by remove."""
    pipe = sd_pipeline(model_dir)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = pipe.unet.mid_block.forward
    pipe.unet.mid_block.forward = counting
    baseline = call(pipe)
    calls.clear()
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=1))
    cached = call(pipe)
    assert len(calls) == 4 and not np.array_equal(cached, baseline)  # the deep mid block ran on the 4 full steps of 8
    postdiff.remove(pipe)
    assert pipe.unet.mid_block.__dict__["forward"] is counting and np.array_equal(call(pipe), baseline)


def test_apply_cleans_up_after_any_exception_during_installation(model_dir, monkeypatch):
    pipe = sd_pipeline(model_dir)
    baseline = call(pipe)

    def broken(*args, **kwargs):
        raise RuntimeError("installation failed half-way")

    monkeypatch.setattr(cross_attention, "apply_cross_attention_cache", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cfg_stop=4))  # DeepCache was installed first
    assert not postdiff.is_applied(pipe) and hook_leftovers(pipe.unet) == []
    assert np.array_equal(call(pipe), baseline)


@pytest.mark.parametrize("branch", [6, 9])
def test_an_invalid_branch_gets_the_same_error_from_apply_plan_and_accounting(model_dir, branch):
    from postdiff.accounting import plan_costs
    from postdiff.models import spec_from_pipeline

    pipe = sd_pipeline(model_dir)
    config = PostDiffConfig(cache_interval=2, cache_branch=branch)
    message = f"cache_branch={branch} is not allowed: this U-Net has branches 0..5"
    with pytest.raises(ConfigError, match=message):
        postdiff.apply(pipe, config)
    spec = spec_from_pipeline(pipe)
    with pytest.raises(ConfigError, match=message):
        spec.plan(config, 8)
    plan = spec.plan(PostDiffConfig(cache_interval=2, cache_branch=5), 8)
    with pytest.raises(ConfigError, match=message):
        plan_costs(spec.denoiser, postdiff.plan.StepPlan(config, plan.phases, plan.steps, plan.facts))


def test_cli_plan_refuses_a_branch_as_generate_does():
    from typer.testing import CliRunner

    from postdiff.cli import app

    result = CliRunner().invoke(app, ["plan", "--cache-interval", "2", "--cache-branch", "9"])
    assert result.exit_code == 2
    assert "cache_branch=9 is not allowed: this U-Net has branches 0..5" in result.output


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m_karras", "pndm", "lcm"])
def test_block_switch_noise_runs_on_every_sample_space(model_dir, name):
    """Block noise needs the noise the last low-resolution state holds: (x_t - alpha x0) / sigma in the
    scheduler's own space (DDPM, Euler's sigma space, DPM's sigma table)."""
    pipe = sd_pipeline(model_dir)
    pipe.scheduler = _scheduler(name)
    iid = call(postdiff.apply(pipe, MIXED), output_type="latent")
    block = call(postdiff.apply(pipe, MIXED.with_changes(switch_noise="block")), output_type="latent")
    assert block.shape == iid.shape and torch.isfinite(block).all() and not torch.equal(block, iid)
