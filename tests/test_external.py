"""External references on the same pipeline: the DeepCache package's own helper and tomesd."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import call, sd_pipeline, sd_unet

import postdiff
from postdiff import PostDiffConfig


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_our_deepcache_equals_the_deepcache_package_bit_for_bit(model_dir, branch, interval):
    """On SD's layout (2 resnets and a down-sampler a block), `cache_branch` is DeepCache's `cache_branch_id`."""
    deepcache_package = pytest.importorskip("DeepCache")
    pipe = sd_pipeline(model_dir)
    pipe.unet = sd_unet(layers_per_block=2)
    helper = deepcache_package.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    reference = call(pipe)
    helper.disable()
    baseline = call(pipe)
    postdiff.apply(pipe, PostDiffConfig(cache_interval=interval, cache_branch=branch))
    assert np.array_equal(call(pipe), reference)
    assert not np.array_equal(reference, baseline)  # the comparison is not between two uncached runs


def test_tomesd_runs_on_the_same_pipeline(model_dir):
    tomesd = pytest.importorskip("tomesd")
    pipe = sd_pipeline(model_dir)
    baseline = call(pipe)
    tomesd.apply_patch(pipe, ratio=0.5)
    merged = call(pipe)
    tomesd.remove_patch(pipe)
    assert merged.shape == baseline.shape and np.abs(merged - baseline).max() > 0
    assert np.array_equal(call(pipe), baseline)
