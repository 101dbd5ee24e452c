"""Sharded calibration under torchrun (2 ranks, gloo): every rank ends with the IR one process
builds from all the batches; an empty shard contributes nothing; differing recipes are refused."""
import pytest
import torch

from .launch import torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return torchrun(["calibration", "recipes"], tmp_path_factory.mktemp("dist_calib"))


def _same_ir(a: dict, b: dict) -> bool:
    return a["state"].keys() == b["state"].keys() and a["literals"] == b["literals"] and \
        all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def _worst_scale_ratio(a: dict, ref: dict) -> float:
    assert a["stats"].keys() == ref["stats"].keys()
    return max(float(((a["stats"][k][0] - s).abs() / s).max()) for k, (s, _, _) in ref["stats"].items())


def _counts_batches(res: dict, n: int) -> None:
    """Activation observers saw n batches (a shared observer sees a few tensors per batch)."""
    counts = [v[2] for k, v in res["stats"].items() if k.startswith("quantize")]
    assert counts and min(counts) == n and all(c % n == 0 for c in counts), counts


@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
def test_minmax_and_moving_average_bit_identical_to_one_process(runs, observer):
    r0, r1 = runs["calibration"][0], runs["calibration"][1]
    ref = r0["ref"][observer]
    assert _same_ir(r0[observer], r1[observer])            # both ranks: one IR
    assert _same_ir(r0[observer], ref)                     # ... and it is one process's, bit for bit
    # every observer counted the batches of both shards (minmax: the calib_samples=200 limit
    # stops at 4 of the 8 batches, as one process does)
    n = {"minmax": 4, "moving_average": 8}[observer]
    _counts_batches(ref, n)
    assert all(r0[observer]["stats"][k][2] == v[2] for k, v in ref["stats"].items())


@pytest.mark.parametrize("observer", ["histogram", "mse", "entropy"])
def test_histogram_family_within_one_percent(runs, observer):
    r0, r1 = runs["calibration"][0], runs["calibration"][1]
    assert _same_ir(r0[observer], r1[observer])
    assert _worst_scale_ratio(r0[observer], r0["ref"][observer]) <= 0.01


def test_smoothquant_maxima_reduced(runs):
    r0, r1 = runs["calibration"][0], runs["calibration"][1]
    smooth = [k for k in r0["smooth"]["state"] if "smooth_inv" in k]
    assert len(smooth) == 2                                # fc1's and fc2's inputs rescaled
    assert _same_ir(r0["smooth"], r1["smooth"]) and _same_ir(r0["smooth"], r0["ref"]["smooth"])


def test_empty_shard_contributes_nothing(runs):
    r0, r1 = runs["calibration"][0], runs["calibration"][1]
    assert _same_ir(r0["empty"], r1["empty"])
    assert _same_ir(r0["empty"], r0["ref"]["empty"])       # = one process on rank 0's 3 batches
    _counts_batches(r0["empty"], 3)


def test_differing_recipes_refused_on_every_rank(runs):
    for rank in (0, 1):
        res = runs["recipes"][rank]
        assert res["error"] is not None
        assert res["field"] == "passes[0].quantize.observer"
        assert "rank 1's recipe differs from rank 0's" in res["error"]
        assert "'histogram'" in res["error"] and "'minmax'" in res["error"]
