"""`fxpress generate`: stream text from a saved causal-LM folder (``lm.save(dir, tokenizer=tok)``).

    fxpress generate smollm2-int4 --prompt "The capital of France is" --max-new-tokens 64
    fxpress generate smollm2-int4 --prompt "Once upon" --sample --temperature 0.7 --top-p 0.9 --seed 0

DIR is a folder ``lm.save(dir, tokenizer=tok)`` writes (an ONNX Runtime GenAI folder for Llama,
Mistral and Qwen2; fxpress.json + model.onnx for other families) or ORT GenAI's own builder does,
with the tokenizer's files. ``--chat`` wraps the prompt in the
tokenizer's chat template.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxpress generate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a saved causal-LM folder (lm.save(dir, tokenizer=tok))")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise InputError(f"{folder}: no tokenizer files (save the model with lm.save(dir, tokenizer=tok))",
                         input_name="folder")
    from transformers import AutoTokenizer, TextStreamer

    from ..saving import load
    tok = AutoTokenizer.from_pretrained(str(folder))
    # an ORT GenAI folder or the generic decoder's (fxpress.json + model.onnx): fxpress.load reads both
    lm = load(folder, **({} if args.threads is None else {"threads": args.threads}))
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = getattr(ids, "input_ids", ids)
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    lm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                streamer=TextStreamer(tok, skip_prompt=False))
    return 0
