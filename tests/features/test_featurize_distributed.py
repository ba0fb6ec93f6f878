"""`mm featurize` under torchrun (2 gloo ranks on the CPU): the store one process writes, and a run with a
rank killed finishes on rerun from the parts already computed."""

import os
import signal

import numpy as np
import zarr

from tests.launch import mm_torchrun, ranks_of, succeeded, wait_for
from trimodal.features.parts import Parts


def assert_same_store(expected, actual) -> None:
    a, b = zarr.open_group(str(expected), mode="r"), zarr.open_group(str(actual), mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    names = sorted(name for name, node in a.members(max_depth=None) if isinstance(node, zarr.Array))
    assert names == sorted(name for name, node in b.members(max_depth=None) if isinstance(node, zarr.Array))
    for name in names:
        assert a[name].shape == b[name].shape and a[name].chunks == b[name].chunks, name
        assert np.array_equal(a[name][:], b[name][:]), name


def test_two_ranks_write_exactly_the_store_of_one_process(mini_shards, mini_features, tmp_path):
    store = tmp_path / "two.zarr"
    result = mm_torchrun("featurize", mini_shards, "--out", store, "--device", "cpu")
    succeeded(result)
    assert_same_store(mini_features, store)
    assert not Parts(store).folder.exists()
    assert "shards written / already complete" in result.stdout and result.stdout.count("image rows") == 1


def test_a_run_with_a_killed_rank_completes_on_rerun_from_its_parts(mini_shards, mini_features, tmp_path):
    store = tmp_path / "killed.zarr"
    parts = Parts(store)
    launcher = mm_torchrun("featurize", mini_shards, "--out", store, "--device", "cpu", wait=False)
    ranks = ranks_of(launcher)
    wait_for(lambda: parts.folder.is_dir() and any(not p.name.endswith(".tmp") for p in parts.folder.iterdir()),
             180, "a first complete part")
    os.kill(ranks[1], signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    done = sorted(p.name for p in parts.folder.iterdir() if not p.name.endswith(".tmp"))
    assert done and len(done) < 6  # some shards were computed, not all
    rerun = mm_torchrun("featurize", mini_shards, "--out", store, "--device", "cpu")
    succeeded(rerun)
    table = "".join(rerun.stdout.split()).replace("│", "")
    assert f"ofthemcomputedbyaninterruptedrun{len(done)}" in table  # only the missing shards were computed
    assert_same_store(mini_features, store)
