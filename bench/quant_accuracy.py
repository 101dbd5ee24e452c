"""Quantization accuracy table: fp32 / static (per observer) / dynamic / QAT, per model.

    .venv/bin/python bench/quant_accuracy.py                 # DigitsCNN + MiniLM-L6 (minutes on 2 cores)
    .venv/bin/python bench/quant_accuracy.py --skip-minilm   # DigitsCNN only
    .venv/bin/python bench/quant_accuracy.py --sentences 480 --max-length 32

DigitsCNN: top-1 on the 397 held-out sklearn digits (trained in tests/digits.py).
MiniLM-L6 (real pretrained weights): min / mean cosine of int8 sentence embeddings against
fp32 over stdlib docstring sentences (fxpress/data.py), with the recipe of
tests/passes/quant/test_minilm.py, plus the plain all-linear recipe for comparison.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxpress  # noqa: E402
from tests.digits import accuracy, batches, digits_data, train_epochs, trained_digits_cnn  # noqa: E402

OBSERVERS = ("minmax", "moving_average", "histogram", "mse", "entropy")


def digits_rows() -> list[tuple[str, str, str]]:
    (xtr, ytr), (xte, yte) = digits_data()
    model = trained_digits_cnn()
    rows = [("DigitsCNN", "fp32", f"{accuracy(model, xte, yte):.4f}")]
    cal = batches(xtr, 50, limit=4)
    for w in ("int8-per-channel-symmetric", "int8-per-tensor-affine"):
        for obs in OBSERVERS:
            cm = fxpress.compress(model, xtr[:50], fxpress.Quantize(mode="static", weights=w,
                                                                    observer=obs), calibration=cal)
            rows.append(("DigitsCNN", f"static {w} / {obs}", f"{accuracy(cm, xte, yte):.4f}"))
    cm = fxpress.compress(model, xtr[:50], fxpress.Quantize(mode="dynamic"))
    rows.append(("DigitsCNN", "dynamic int8-per-channel-symmetric", f"{accuracy(cm, xte, yte):.4f}"))
    for obs in ("moving_average", "lsq"):
        cm = fxpress.compress(model, xtr[:64], fxpress.Quantize(mode="qat", observer=obs,
                                                                freeze_bn_after=40),
                              calibration=batches(xtr, 64, limit=3))
        train_epochs(cm, xtr, ytr, epochs=2, lr=3e-4, batch=64)   # the user's own loop
        q = fxpress.convert(cm)
        rows.append(("DigitsCNN", f"QAT / {obs} (2 epochs)", f"{accuracy(q, xte, yte, batch=64):.4f}"))
    return rows


def minilm_rows(n_sentences: int, max_length: int) -> list[tuple[str, str, str]]:
    from fxpress.data import MiniLMEmbedder, load_minilm, stdlib_sentences, tokenize
    model, tok = load_minilm()
    emb = MiniLMEmbedder(model).eval()
    sents = stdlib_sentences(n_sentences)
    bs = 48
    data = []
    for i in range(0, len(sents) - bs + 1, bs):
        e = tokenize(tok, sents[i:i + bs], max_length=max_length)
        data.append((e["input_ids"], e["attention_mask"]))
    with torch.no_grad():
        ref = torch.cat([emb(*b) for b in data])
    n = ref.shape[0]
    rows = [(f"MiniLM-L6 ({n} sentences)", "fp32", "min cos 1.0000")]

    def cos_of(q):
        cm = fxpress.compress(emb, data[0], q, calibration=data[:3])
        with torch.no_grad():
            out = torch.cat([cm(*b) for b in data])
        c = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        return f"min cos {float(c.min()):.4f} / mean {float(c.mean()):.4f}"

    tuned = dict(ops=("linear",), quantize_outputs=False, smooth=0.5,
                 skip=("model.encoder.layer.[0-3].output.dense",))
    plain = dict(ops=("linear",), quantize_outputs=False)
    for obs in ("histogram", "minmax"):
        rows.append((rows[0][0], f"static all linears / {obs}", cos_of(fxpress.Quantize(observer=obs, **plain))))
    rows.append((rows[0][0], "dynamic all linears", cos_of(fxpress.Quantize(mode="dynamic", **plain))))
    for obs in ("histogram", "minmax", "mse"):
        rows.append((rows[0][0], f"static tuned (smooth 0.5, 4 FFN-out float) / {obs}",
                     cos_of(fxpress.Quantize(observer=obs, **tuned))))
    rows.append((rows[0][0], "dynamic tuned (smooth 0.5, 4 FFN-out float)",
                 cos_of(fxpress.Quantize(mode="dynamic", **tuned))))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--sentences", type=int, default=480)
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = [] if args.skip_digits else digits_rows()
    if not args.skip_minilm:
        rows += minilm_rows(args.sentences, args.max_length)
    print("| model | quantization | accuracy |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
