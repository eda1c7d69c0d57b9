"""External references on the same pipeline: the DeepCache package's own helper and tomesd."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import call, sd_pipeline

import postdiff
from postdiff import PostDiffConfig

# On the tiny 3-level U-Net, DeepCache's `cache_branch_id` counts its branches its own way; these pairs give
# the same skip branch, and the outputs must then be bit-identical.
SAME_BRANCH = [(0, 1), (1, 3), (2, 4)]


@pytest.mark.parametrize("ours, theirs", SAME_BRANCH)
def test_our_deepcache_equals_the_deepcache_package_bit_for_bit(model_dir, ours, theirs):
    deepcache_package = pytest.importorskip("DeepCache")
    pipe = sd_pipeline(model_dir)
    helper = deepcache_package.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=theirs)
    helper.enable()
    reference = call(pipe)
    helper.disable()
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=ours))
    assert np.array_equal(call(pipe), reference)


def test_tomesd_runs_on_the_same_pipeline(model_dir):
    tomesd = pytest.importorskip("tomesd")
    pipe = sd_pipeline(model_dir)
    baseline = call(pipe)
    tomesd.apply_patch(pipe, ratio=0.5)
    merged = call(pipe)
    tomesd.remove_patch(pipe)
    assert merged.shape == baseline.shape and np.abs(merged - baseline).max() > 0
    assert np.array_equal(call(pipe), baseline)
