"""TVM backend: fp32 and int8 (PT2E Q/DQ form) graphs match the IR; errors, save/load, tuning cache.

Untuned compiles only (correctness); one tiny tuning run proves the database write / re-use path.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import UnsupportedOpError

tvm = pytest.importorskip("tvm")
from fxpress.backends.tvm import TuneOptions, compile_tvm, load
from fxpress.backends.tvm.tune import database_dir, load_database


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(x, 1) + x
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


class SmallTransformer(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.layer(x))


def _cnn():
    torch.manual_seed(0)
    from tests.models import randomize_bn
    return randomize_bn(SmallCNN()).eval(), (torch.randn(2, 3, 8, 8),)


def _transformer():
    torch.manual_seed(0)
    return SmallTransformer().eval(), (torch.randn(2, 5, 16),)


def _pt2e_int8(gm, inputs):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, q)
    for i in range(3):
        prepared(*[t + 0.1 * i for t in inputs])
    return convert_pt2e(prepared)


def _max_act_scale(gm) -> float:
    qd = torch.ops.quantized_decomposed
    return max(n.args[1] for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default)


@pytest.mark.parametrize("build", [_cnn, _transformer], ids=["cnn", "transformer"])
def test_fp32_matches_ir(build):
    model, inputs = build()
    gm = fxpress.capture(model, inputs)
    run = fxpress.lower(gm, backend="tvm", example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)
    assert run.report["lowering"].get("conv2d_int8", 0) == 0


@pytest.mark.parametrize("build", [_cnn, _transformer], ids=["cnn", "transformer"])
def test_int8_matches_ir_and_computes_in_integers(build):
    model, inputs = build()
    qgm = _pt2e_int8(fxpress.capture(model, inputs), inputs)
    run = compile_tvm(qgm, inputs)
    low = run.report["lowering"]
    # every conv / linear whose inputs are Q/DQ'd took the int8 x int8 -> int32 path
    assert low.get("conv2d_int8", 0) + low.get("linear_int8", 0) >= 3, low
    if build is _cnn:
        assert low == {"conv2d_int8": 2, "linear_int8": 1}
    with torch.no_grad():
        want, got = qgm(*inputs), run(*inputs)
    # integer accumulation is exact; only float rounding of the rescale differs, which can move
    # a value across a rounding boundary: at most one quantization step anywhere.
    step = _max_act_scale(qgm)
    assert (got - want).abs().max().item() <= step, (got - want).abs().max()
    assert (got - want).abs().mean().item() <= 0.05 * step


def test_dynamic_batch_compiles_per_shape_cached_and_matches_eager():
    """A CNN IR with a dynamic batch (Dim.AUTO on dim 0): batch 1 and 7 run and match eager;
    each new shape is compiled once (the kernels are static), a repeated shape is not."""
    model, inputs = _cnn()
    gm = fxpress.capture(model, inputs, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    from fxpress.ir.signature import signature
    assert signature(gm).is_dynamic
    run = fxpress.lower(gm, backend="tvm", example_inputs=inputs)
    for batch in (1, 7, 1):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            got, want = run(x), model(x)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    shapes = run.report["shapes"]
    assert shapes["mode"].startswith("per-shape compile")
    assert [c["shape"][0][0] for c in shapes["compiled"]] == [2, 1, 7]  # batch 1 compiled once
    with pytest.raises(fxpress.errors.InputError):
        run(torch.randn(7, 4, 8, 8))  # channels are static


class _KwargsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        y = self.lin(x) * scale
        return {"logits": y, "pooled": y.mean(1)}


def test_kwargs_model_returns_its_dict_and_checks_inputs():
    """model(**kw) style: the TVM callable takes the kwargs, returns the dict, and names a bad input."""
    model = _KwargsDict().eval()
    kw = {"x": torch.randn(2, 8), "scale": torch.randn(2, 4)}
    gm = fxpress.capture(model, (), example_kwargs=kw)
    run = fxpress.lower(gm, backend="tvm", example_inputs=(), example_kwargs=kw)
    kw7 = {"x": torch.randn(7, 8), "scale": torch.randn(7, 4)}
    with torch.no_grad():
        got, want = run(**kw7), model(**kw7)
    assert isinstance(got, dict) and set(got) == {"logits", "pooled"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(fxpress.errors.InputError, match="scale"):
        run(x=torch.randn(7, 8))
    with pytest.raises(fxpress.errors.InputError, match="'x'.*float64"):
        run(x=torch.randn(7, 8).double(), scale=torch.randn(7, 4))


def test_int8_relax_has_integer_conv():
    from fxpress.backends.tvm.convert import to_relax
    model, inputs = _cnn()
    imp = to_relax(_pt2e_int8(fxpress.capture(model, inputs), inputs), inputs)
    text = imp.mod.script()
    assert 'R.nn.conv2d' in text and 'out_dtype="int32"' in text
    assert '"uint8"' in text and '"int8"' in text


def test_pruned_and_factorized_graphs_lower():
    """The real passes' output: half the CNN's channels removed; Tucker-2 convs and SVD linear."""
    model, inputs = _cnn()
    pruned = fxpress.compress(model, inputs, fxpress.ChannelPruning(ratio=0.5, round_to=1))
    tucker = fxpress.compress(model, inputs, fxpress.LowRank(method="tucker", rank=(2, 2)))
    fact = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    svd = fxpress.compress(fact, (torch.randn(3, 32),), fxpress.LowRank(method="svd", rank=4))
    def size(m):
        return sum(t.numel() for t in m.state_dict().values())

    for cm, ins, orig in [(pruned, inputs, model), (tucker, inputs, model), (svd, (torch.randn(3, 32),), fact)]:
        assert size(cm.graph_module) < size(orig)  # the pass really changed the graph
        run = fxpress.lower(cm, backend="tvm", example_inputs=ins)
        # odd channel counts left by pruning still get the conv template (partial vectors)
        assert run.report["schedules"]["unscheduled"] == 0, run.report["schedules"]
        with torch.no_grad():
            torch.testing.assert_close(run(*ins), cm.graph_module(*ins), atol=1e-4, rtol=1e-4)


torch.library.define("fxpress_test::mystery", "(Tensor x) -> Tensor")


@torch.library.impl("fxpress_test::mystery", "CompositeExplicitAutograd")
def _mystery(x):
    return x * 2


@torch.library.register_fake("fxpress_test::mystery")
def _mystery_fake(x):
    return torch.empty_like(x)


class _Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.fxpress_test.mystery(self.lin(x))


def test_unsupported_op_names_op_and_node():
    inputs = (torch.randn(2, 4),)
    gm = fxpress.capture(_Mystery().eval(), inputs)
    with pytest.raises(UnsupportedOpError) as ei:
        compile_tvm(gm, inputs)
    assert "fxpress_test.mystery" in str(ei.value) and "mystery" in ei.value.node_name


def test_save_and_load_runs_without_fxpress_passes(tmp_path):
    model, inputs = _cnn()
    gm = fxpress.capture(model, inputs)
    run = compile_tvm(gm, inputs)
    path = run.save(tmp_path / "cnn.so")
    assert path.exists() and json.loads((tmp_path / "cnn.so.json").read_text())["kind"] == "llvm"
    loaded = load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)
    with pytest.raises(fxpress.errors.InputError, match=r"compiled for \[2, 3, 8, 8\]"):
        loaded(torch.randn(3, 3, 8, 8))  # the library holds the example shape's static kernels


def test_host_target_has_cpu_features():
    """mcpu is LLVM's host name only where hw reports every feature it implies
    (tests/backends/test_tvm_target.py simulates a host where it does not)."""
    from fxpress import hw
    from fxpress.backends.tvm import host_target
    t = host_target()
    assert t.kind.name == "llvm" and t.attrs["num-cores"] >= 1
    feats = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(t)}
    assert ("avx512f" in feats) == hw.host().avx512f and ("avx2" in feats) == hw.host().avx2


@pytest.mark.cuda
def test_cuda_matches_ir():
    from fxpress.backends.tvm.build import cuda_available
    if not cuda_available():
        pytest.skip("no CUDA device visible to TVM")
    model, inputs = _cnn()
    gm = fxpress.capture(model, inputs)
    run = compile_tvm(gm, inputs, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs).cpu(), gm(*inputs), atol=1e-4, rtol=1e-4)


def test_tune_options_validated():
    with pytest.raises(fxpress.RecipeError, match="trials"):
        TuneOptions(trials=0)
    with pytest.raises(fxpress.RecipeError, match="time_budget_s"):
        TuneOptions(time_budget_s=-1)
    with pytest.raises(fxpress.RecipeError, match="trials_per_task"):
        TuneOptions(trials_per_task=0)


def test_tuning_cache_lives_under_fxpress_cache(tmp_path, monkeypatch):
    from fxpress.backends.tvm.tune import cache_root
    monkeypatch.delenv("FXPRESS_TVM_CACHE", raising=False)
    monkeypatch.setenv("FXPRESS_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "tvm"
    monkeypatch.setenv("FXPRESS_TVM_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_corrupt_or_foreign_database_is_ignored_with_warning(tmp_path):
    target = fxpress.backends.tvm.host_target()
    path = database_dir(tmp_path, "k" * 24, target)
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "x"}))
    with pytest.warns(UserWarning, match="another graph"):
        assert load_database(path, "k" * 24, target) is None
    from fxpress.backends.tvm.tune import _manifest
    (path / "manifest.json").write_text(json.dumps(_manifest("k" * 24, target)))
    (path / "workload.json").write_text("{not json")
    (path / "records.json").write_text("garbage\n")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_database(path, "k" * 24, target) is None


def test_tuning_writes_database_and_second_compile_reuses_it(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    inputs = (torch.randn(4, 32),)
    gm = fxpress.capture(model, inputs)
    opts = TuneOptions(trials=4, trials_per_round=4, time_budget_s=120, population=16,
                       cache_dir=str(tmp_path), progress=False)
    first = compile_tvm(gm, inputs, tune=opts)
    t = first.report["tuning"]
    # One task (the matmul+add), one round of 4 candidates: each builds in a fresh popen
    # worker, so this also guards the builder's start-up cost against its timeout.
    assert not t["cached"] and t["trials"] == 4 and t["tasks"] == 1 and t["records"] >= 1, t
    assert t["failed"] < t["measured"], t
    assert (tmp_path / next(p.name for p in tmp_path.iterdir()) / "records.json").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = compile_tvm(gm, inputs, tune=opts)
    assert not [w for w in caught if "tuning database" in str(w.message)]  # valid: no warning
    assert second.report["tuning"]["cached"] and second.report["tuning"]["trials"] == 0
    assert second.report["tuning"]["seconds"] == 0.0  # no search process was started
    assert second.report["compile_s"] < first.report["compile_s"] - t["seconds"] / 2
    with torch.no_grad():
        torch.testing.assert_close(second(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)
