"""The demo's pruned + int8 helper: distillation from the fp32 teacher must recover agreement that
prune + int8 alone (BN re-estimated, no training) loses; BN re-estimation sets each BN's statistics."""
from __future__ import annotations

import torch

from fxpress.commands.demo_prune import pruned_int8
from fxpress.passes.prune.bn_recal import bn_nodes, recalibrate_bn
from fxpress.real import agreement
from tests.digits import batches, digits_data, trained_digits_cnn


def test_distillation_recovers_what_pruning_and_int8_lose():
    model = trained_digits_cnn()
    (xtr, _), (xte, _) = digits_data()
    example = (xte[:1],)
    with torch.no_grad():
        ref = model(xte).argmax(-1)
    data = batches(xtr, 50)                    # training split, without labels: pure KD
    calib = batches(xtr, 50, limit=4)
    kw = dict(calibration=calib, train=data, bn=calib, ratio=0.75, caps={"fc1": 0.0})
    plain = pruned_int8(model, example, steps=0, **kw)
    log: dict = {}
    kd = pruned_int8(model, example, steps=80, lr=3e-3, log=log, **kw)
    gm = kd.graph_module
    st = kd.report["prune_channels"]
    assert st["channels_removed"] == 32                  # conv1 16 -> 8 (round_to 8), conv2 32 -> 8
    assert log["bn"]["bn_nodes"] == 2 and log["distill"]["loss_last"] < log["distill"]["loss_first"]
    assert sum("quantize_per" in str(n.target) for n in gm.graph.nodes) >= 3   # int8 Q/DQ
    with torch.no_grad():
        a_plain = agreement(ref, plain(xte).argmax(-1))                    # held-out test split
        a_kd = agreement(ref, kd(xte).argmax(-1))
    assert a_kd >= 0.95 and a_kd >= a_plain + 0.05, (a_plain, a_kd)   # measured 0.625 -> 0.987 (l2 importance: 0.869 -> 0.990)
    assert next(model.parameters()).shape[0] == 16                         # the teacher untouched


def test_bn_recalibration_matches_batch_statistics():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    import fxpress
    x = torch.randn(64, 3, 10, 10) * 3 + 1
    gm = fxpress.capture(m, (x[:1],))
    assert len(bn_nodes(gm)) == 2
    stats = recalibrate_bn(gm, [(x[i:i + 16],) for i in range(0, 64, 16)])
    assert stats == {"bn_nodes": 2, "batches": 4}
    # the reference: PyTorch's own re-estimation (train mode, cumulative average) on the same batches
    ref_m = m.train()
    for bn in (ref_m[1], ref_m[4]):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for i in range(0, 64, 16):
            ref_m(x[i:i + 16])
    ref_m.eval()
    got = dict(gm.named_buffers())
    for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        torch.testing.assert_close(got[name], dict(ref_m.named_buffers())[name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref_m(x), rtol=1e-4, atol=1e-4)


def test_speedup_lines_and_training_crops():
    import pytest

    from fxpress.commands.demo_report import Row, _speedups
    from fxpress.errors import InputError
    from fxpress.real import photo_sets, photo_train
    rows = [Row("fp32", "onnxruntime", 1, 1.0, 1, 4.0), Row("fxpress int8 static", "onnxruntime", 1, 1.0, 1, 2.0),
            Row("fxpress pruned 25% + int8 static", "onnxruntime", 1, 1.0, 1, 1.6)]
    lines = _speedups(rows)
    assert lines == ["- fxpress int8 static [onnxruntime]: 2.00x its fp32 row",
                     "- fxpress pruned 25% + int8 static [onnxruntime]: 2.50x its fp32 row, "
                     "1.25x the unpruned int8 row"]
    with pytest.raises(InputError, match="seed 0"):
        photo_train(4, seed=0)
    train = photo_train(8, 224, seed=1)
    calib, ev = photo_sets(8, 8)
    assert train.shape == (8, 3, 224, 224)
    # no training crop is a calibration or evaluation crop
    d = torch.cdist(train.flatten(1), torch.cat([calib, ev]).flatten(1))
    assert float(d.min()) > 1.0
