"""Fine-tuning compressed models under DistributedDataParallel (torchrun, 2 ranks, gloo):
QAT converts to one IR on both ranks at single-process accuracy, distillation of a pruned
student through taps keeps the ranks equal, iterative pruning decides once for all ranks."""
import pytest
import torch

from .launch import torchrun


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    return torchrun(["qat"], tmp_path_factory.mktemp("dist_qat"))["qat"]


@pytest.fixture(scope="module")
def distill_prune(tmp_path_factory):
    return torchrun(["distill", "prune"], tmp_path_factory.mktemp("dist_distill"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_qat_ranks_equal_and_single_process_accuracy(qat):
    r0, r1 = qat[0], qat[1]
    assert _equal(r0["params"], r1["params"])                    # DDP kept the weights equal
    assert _equal(r0["q"]["state"], r1["q"]["state"])            # int8 weights, scales, zps
    assert r0["q"]["literals"] == r1["q"]["literals"]            # activation qparams
    assert r0["q"]["literals"]                                   # (static Q/DQ was produced)
    assert r0["acc"] == r1["acc"]
    assert abs(r0["acc"] - r0["ref_acc"]) <= 0.005, (r0["acc"], r0["ref_acc"])
    assert r0["acc"] >= r0["fp32_acc"] - 0.005


def test_ddp_distillation_with_taps_ranks_agree(distill_prune):
    r0, r1 = distill_prune["distill"][0], distill_prune["distill"][1]
    assert _equal(r0["params"], r1["params"])
    assert not _equal(r0["params"], r0["init"])                  # it trained
    assert r0["adapter_init"] == {"conv2": "selection"}          # the hint tap ran
    assert r0["history"][0]["hint"] > 0
    assert r0["history"] != r1["history"]                        # each rank saw its own shard
    assert r0["after"] >= 0.9
    assert _equal(r0["self"], r1["self"])                        # self distillation too


def test_iterative_pruning_decided_once(distill_prune):
    r0, r1 = distill_prune["prune"][0], distill_prune["prune"][1]
    # alone, the ranks would prune different channels (rank 1 calibrates on noise) ...
    assert not (r0["alone_shapes"] == r1["alone_shapes"] and _equal(r0["alone"], r1["alone"]))
    # ... together both take rank 0's decisions
    assert r0["shapes"] == r1["shapes"] and _equal(r0["state"], r1["state"])
    assert _equal(r1["state"], r0["alone"])
    assert r0["shapes"]["conv2.weight"][0] < 32                  # channels were removed
