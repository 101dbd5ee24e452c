"""cm.save / fxpress.load: a CompressedModel reloads in a fresh process with bit-identical
outputs, lowers and fine-tunes as before, and stays compressed on disk."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxpress
from tests import models

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: load the saved model, call it on the saved inputs, optionally
# lower it / take one SGD step, and save what came out for the parent to compare.
_CHILD = textwrap.dedent("""
    import sys, torch
    import fxpress
    path, io, out, lower_to, step = sys.argv[1:6]
    args, kwargs = torch.load(io, weights_only=False)
    cm = fxpress.load(path)
    res = {"type": type(cm).__name__, "out": cm(*args, **kwargs)}
    if lower_to != "-":
        res["lowered"] = fxpress.lower(cm, lower_to)(*args, **kwargs)
    if step == "1":
        cm.train()
        opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
        cm(*args, **kwargs).pow(2).mean().backward()
        opt.step()
        res["stepped"] = {k: v.detach().clone() for k, v in cm.state_dict().items()}
    torch.save(res, out)
""")


def _fresh(tmp_path, cm_path, args, kwargs=None, lower_to="-", step=False) -> dict:
    io, out = tmp_path / "io.pt", tmp_path / "out.pt"
    torch.save((tuple(args), dict(kwargs or {})), io)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(cm_path), str(io), str(out), lower_to,
                        "1" if step else "0"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _equal(a, b) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb))


def _fp32_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_static_int8_cnn_reloads_in_a_fresh_process_lowers_finetunes_and_is_small(tmp_path):
    model = models.resnet18(width=16, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    cm = fxpress.compress(model, (x,), fxpress.Quantize(mode="static"),
                          calibration=[torch.randn(2, 3, 32, 32) for _ in range(2)])
    path = cm.save(tmp_path / "r18.fxp")
    # compressed weights stay compressed: <= 0.35x the fp32 state dict
    assert path.stat().st_size <= 0.35 * _fp32_bytes(model), (path.stat().st_size, _fp32_bytes(model))
    x5 = torch.randn(5, 3, 32, 32)  # another batch size: the dynamic batch is kept
    got = _fresh(tmp_path, path, (x5,), lower_to="onnxruntime")
    assert got["type"] == "CompressedModel"
    assert torch.equal(got["out"], cm(x5))
    assert torch.equal(got["lowered"], fxpress.lower(cm, "onnxruntime")(x5))


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _enc(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, s // 2:] = 0
    return {"input_ids": torch.randint(0, 128, (b, s), generator=g), "attention_mask": mask}


def test_dynamic_int8_hf_bert_keeps_kwargs_and_model_output(tmp_path):
    from torch.export import Dim
    model = _tiny_bert()
    batch, seq = Dim("batch"), Dim("seq", max=64)
    cm = fxpress.compress(model, _enc(2, 16), fxpress.Quantize(mode="dynamic"),
                          calibration=[_enc(4, 16, seed=2)], dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                          "attention_mask": {0: batch, 1: seq}})
    path = cm.save(tmp_path / "bert.fxp")
    other = _enc(3, 9, seed=1)
    got = _fresh(tmp_path, path, (), other)
    ref = cm(**other)
    assert type(got["out"]).__name__ == type(ref).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert _equal(got["out"], ref)
    again = fxpress.load(path)
    assert [s.shape for s in fxpress.ir.signature.signature(again.graph_module).inputs] == \
        [("batch", "seq")] * 2
    assert again.recipe == cm.recipe and str(again.report) == str(cm.report)


def test_weight_only_int4_llama_is_packed_and_identical(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    cm = fxpress.compress(model, (ids,), fxpress.WeightOnly(bits=4, group_size=32))
    path = cm.save(tmp_path / "llama4.fxp")
    from fxpress.saving import _Packed4
    state = torch.load(path, weights_only=False)
    packed = [v for v in state["tensors"].values() if isinstance(v, _Packed4)]
    assert len(packed) == 2 * 7  # q, k, v, o, gate, up, down per layer (lm_head stays float)
    assert all(p.data.numel() * 2 >= torch.Size(p.shape).numel() for p in packed)
    other = torch.randint(0, 128, (3, 12))
    got = _fresh(tmp_path, path, (other,))
    assert _equal(got["out"], cm(other))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 8 * 8, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def test_pruned_and_factorized_net_reloads_identically(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 8, 8)
    cm = fxpress.compress(model, (x,), [fxpress.ChannelPruning(ratio=0.5),
                                        fxpress.LowRank(method="svd", energy=0.9)])
    assert sum(p.numel() for p in cm.parameters()) < sum(p.numel() for p in model.parameters())
    path = cm.save(tmp_path / "pf.fxp")
    x4 = torch.randn(4, 3, 8, 8)
    got = _fresh(tmp_path, path, (x4,), step=True)
    assert torch.equal(got["out"], cm(x4))
    # fine-tunes as before: the same SGD step here gives the same parameters
    import copy
    twin = copy.deepcopy(cm).train()
    opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    twin(x4).pow(2).mean().backward()
    opt.step()
    mine = twin.state_dict()
    assert mine.keys() == got["stepped"].keys()
    assert all(torch.equal(mine[k], got["stepped"][k]) for k in mine)
    assert not all(torch.equal(mine[k], cm.state_dict()[k]) for k in mine)  # the step moved them


def test_interrupted_save_leaves_nothing_and_keeps_the_old_file(tmp_path):
    model = models.digits_cnn()
    x = models.example_inputs("digits_cnn")
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=[x])
    target = tmp_path / "d.fxp"

    class _Interrupt:
        def __reduce__(self):  # pickled mid-write, after the tensors started to go out
            raise KeyboardInterrupt

    cm.report.sections["late"] = _Interrupt()
    with pytest.raises(KeyboardInterrupt):
        cm.save(target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file
    del cm.report.sections["late"]
    cm.save(target)
    before = target.read_bytes()
    cm.report.sections["late"] = _Interrupt()
    with pytest.raises(KeyboardInterrupt):
        cm.save(target)
    assert target.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_killed_save_never_leaves_a_partial_file_at_the_target(tmp_path):
    """SIGKILL mid-write (no cleanup can run): the target path holds nothing or a whole model."""
    code = textwrap.dedent(f"""
        import os, signal, torch, fxpress
        from tests import models
        cm = fxpress.compress(models.resnet18(width=16, num_classes=10), torch.randn(1, 3, 32, 32))
        real = torch.save
        def dying(obj, f, *a, **k):
            real(obj, f, *a, **k)           # the temp file is complete ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the rename
        torch.save = dying
        cm.save({str(tmp_path / 'k.fxp')!r})
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == -9, p.stderr[-2000:]
    assert not (tmp_path / "k.fxp").exists()


def test_torch_save_of_a_compressed_model_works(tmp_path):
    model = models.digits_cnn()
    x = models.example_inputs("digits_cnn")
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=[x])
    torch.save(cm, tmp_path / "cm.pt")
    back = torch.load(tmp_path / "cm.pt", weights_only=False)
    assert torch.equal(back(*x), cm(*x))


def test_load_names_what_it_cannot_read(tmp_path):
    with pytest.raises(fxpress.InputError, match="no such file"):
        fxpress.load(tmp_path / "missing.fxp")
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(fxpress.InputError, match="not a file fxpress can load"):
        fxpress.load(tmp_path / "junk.bin")
    with pytest.raises(fxpress.InputError, match="genai_config.json"):
        fxpress.load(tmp_path)
