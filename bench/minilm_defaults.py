"""Real MiniLM-L6 with the UNCHANGED defaults Quantize(mode="dynamic") / Quantize(mode="static"),
calibrated and evaluated on `tokenizer(..., padding=True)` batches of varying length (issue 24
item 2, issue 23 item 3): min cosine vs fp32 over >= 500 real sentences, and ORT int8 / fp32 time.

    .venv/bin/python -m bench.minilm_defaults [--modes dynamic static] [--time]

Prints one line per mode: min / mean cosine, the nodes the default kept float, and (with --time)
the int8 vs fp32 ORT latency ratio on one 8 x 128 batch, both timed in the same process in
interleaved rounds.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.export import Dim

import fxpress
from fxpress.data import MiniLMEmbedder, load_minilm, stdlib_sentences


def padded_batches(tok, texts: list[str], batch: int = 8, max_length: int = 128) -> list[tuple]:
    """`tokenizer(texts[i:i+batch], padding=True)`: each batch as long as its longest sentence."""
    out = []
    for i in range(0, len(texts) // batch * batch, batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def setup(n_sentences: int = 528):
    model, tok = load_minilm(attn_implementation="eager")
    model = MiniLMEmbedder(model).eval()
    batches = padded_batches(tok, stdlib_sentences(n_sentences))
    dyn = tuple({0: Dim("batch"), 1: Dim("seq", max=128)} for _ in range(2))
    return model, batches, dyn


def evaluate(model, run, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.nn.functional.cosine_similarity(run(*b), model(*b), dim=-1)
                          for b in batches])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["dynamic", "static"])
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args(argv)
    model, batches, dyn = setup()
    calib = batches[1::4][:16]
    example = max(batches, key=lambda b: b[0].shape[1])
    for mode in args.modes:
        t0 = time.perf_counter()
        cm = fxpress.compress(model, example, fxpress.Quantize(mode=mode), calibration=calib,
                              dynamic_shapes=dyn)
        run = fxpress.lower(cm, "onnxruntime", example_inputs=example)
        cos = evaluate(model, run, batches)
        kept = cm.report.sections.get("quant_float_nodes", [])
        print(f"{mode}: min cos {float(cos.min()):.4f} mean {float(cos.mean()):.4f} over "
              f"{cos.numel()} sentences, lengths {min(b[0].shape[1] for b in batches)}-"
              f"{max(b[0].shape[1] for b in batches)}; kept float {len(kept)}: "
              f"{[(k['module'], k['op'], k['cost_db']) for k in kept]} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        if args.time:
            from fxpress.timing import interleaved_medians
            fp32 = fxpress.lower(fxpress.capture(model, example, dynamic_shapes=dyn),
                                 "onnxruntime", example_inputs=example)
            ids, mask = example        # padded to 8 x 128, as issue 24's bench times it
            pad = 128 - ids.shape[1]
            x = (torch.nn.functional.pad(ids, (0, pad)), torch.nn.functional.pad(mask, (0, pad)))
            med = interleaved_medians({"fp32": fp32, "int8": run}, x, rounds=7, per_round=5)
            print(f"  ORT 8x128: fp32 {med['fp32']:.1f} ms, int8 {med['int8']:.1f} ms, "
                  f"speed-up {med['fp32'] / med['int8']:.2f}x "
                  "(interleaved rounds, one process)", flush=True)


if __name__ == "__main__":
    main()
