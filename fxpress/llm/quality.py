"""Quality of a compressed causal LM: perplexity on real text and greedy agreement with fp32.

    text_ids = corpus_ids(tok)                            # Python's own reference docs, tokenized
    ppl = perplexity(model, text_ids[:, :4096])            # sliding window (HF's recipe)
    qm = effective_model(model, cm)                        # the HF model with the IR's weights
    agree = greedy_agreement(model, qm, tok, PROMPTS)      # new tokens equal before the 1st difference
    agree = forced_agreement(qm, tok, PROMPTS, refs)       # the same count, one forward per prompt

The text: ``pydoc_data.topics`` -- the Python Language Reference sections that ``help()`` shows,
shipped with every CPython (3.11.7 here: 79 topics, 465 k characters of English technical prose
with code), in sorted topic order. It is PSF-licensed documentation, not public domain: no
public-domain book ships on this machine (nltk_data is not installed) and this is the longest
real English text that does. Evaluation uses the first tokens of the corpus; calibration
(`calibration_batches`) uses sequences from its end, so they never overlap.

`effective_model` copies the user's HF model and sets each linear to the weight the IR computes
with (a weight-only linear's dequantized weight; AWQ's ``x * (1/s)`` folded into the weight's
columns): HF's own forward and ``generate`` then run the compressed numerics, so these metrics
do not depend on a backend.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx

__all__ = ["PROMPTS", "corpus_text", "corpus_ids", "calibration_batches", "perplexity",
           "prefix_agreement", "greedy_agreement", "greedy_tokens", "forced_agreement", "effective_model",
           "chat_prompt_ids"]

aten = torch.ops.aten

PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Write a short poem about the sea at night.",
    "Give three tips for writing clean Python code.",
    "What causes the seasons on Earth?",
    "Summarize the story of Romeo and Juliet in a few sentences.",
    "How do I make a simple tomato pasta sauce?",
    "What is the difference between a virus and a bacterium?",
    "Describe the water cycle.",
    "Why is exercise good for your health?",
)


def corpus_text() -> str:
    """Python's reference-manual topics (``pydoc_data.topics``), sorted by topic name."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_ids(tokenizer) -> torch.Tensor:
    """The whole corpus as token ids [1, N] (~115 k SmolLM2 tokens)."""
    return torch.tensor([tokenizer(corpus_text())["input_ids"]], dtype=torch.long)


def calibration_batches(ids: torch.Tensor, n: int = 16, seq_len: int = 256) -> list[tuple]:
    """`n` sequences of `seq_len` tokens from the *end* of `ids` [1, N] (evaluation reads the
    start): ``compress(..., calibration=calibration_batches(ids))``."""
    total = ids.shape[1]
    if n * seq_len > total // 2:
        raise ValueError(f"{n} x {seq_len} calibration tokens would overlap the evaluation half "
                         f"of a {total}-token corpus")
    return [(ids[:, total - (i + 1) * seq_len: total - i * seq_len].clone(),) for i in range(n)]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, window: int = 1024, stride: int = 512) -> float:
    """exp(mean next-token NLL) over `ids` [1, N] with a sliding window (transformers'
    perplexity recipe): each window scores only the tokens the previous one did not, each with
    up to `window` - `stride` tokens of context. `model(ids)` returns logits or an HF output."""
    n = ids.shape[1]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        new = end - prev_end
        x = ids[:, begin:end]
        out = model(x)
        logits = getattr(out, "logits", out)
        logits, target = logits[0, :-1].float(), x[0, 1:].clone()
        target[: max(0, target.shape[0] - new)] = -100  # scored by an earlier window
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((target != -100).sum())
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count)


def prefix_agreement(ref: torch.Tensor, out: torch.Tensor) -> int:
    """How many leading tokens of `out` equal `ref` (1-d new tokens), before the first difference."""
    n = min(ref.numel(), out.numel())
    diff = (ref[:n] != out[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, T] ids of `prompt` in the tokenizer's chat template (plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.long)


@torch.no_grad()
def _greedy(gen, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    if hasattr(gen, "config"):  # an HF model: its own generate (KV cache, greedy)
        out = gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    else:  # an fxpress Generator
        out = gen.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    return out[0, ids.shape[1]:]


def greedy_agreement(reference, candidate, tokenizer, prompts=PROMPTS, *, new_tokens: int = 64,
                     reference_tokens: list | None = None) -> tuple[list[int], list]:
    """([tokens equal before the first difference, per prompt], reference new tokens): greedy
    `new_tokens` from each chat-formatted prompt, EOS ignored so every row is full length.
    `reference`/`candidate` are HF models or fxpress Generators; pass `reference_tokens` from an
    earlier call to skip regenerating the reference."""
    refs = list(reference_tokens) if reference_tokens is not None else []
    agree = []
    for i, p in enumerate(prompts):
        ids = chat_prompt_ids(tokenizer, p)
        if i >= len(refs):
            refs.append(_greedy(reference, ids, new_tokens))
        agree.append(prefix_agreement(refs[i], _greedy(candidate, ids, new_tokens)))
    return agree, refs


def greedy_tokens(gen, tokenizer, prompts=PROMPTS, new_tokens: int = 64) -> list:
    """Greedy new tokens (EOS ignored) of an HF model or Generator for each chat-formatted prompt."""
    return [_greedy(gen, chat_prompt_ids(tokenizer, p), new_tokens) for p in prompts]


@torch.no_grad()
def forced_agreement(candidate, tokenizer, prompts, reference_tokens: list) -> list[int]:
    """`greedy_agreement` in one forward per prompt: the candidate (an HF model or a callable
    returning logits) reads each prompt followed by the reference's greedy new tokens; the count
    is the first position whose argmax differs from the reference token. Equal to the greedy
    prefix agreement (up to that position both generations read the same tokens) up to the
    float rounding of a full-sequence forward vs cached decoding."""
    agree = []
    for p, ref in zip(prompts, reference_tokens):
        ids = chat_prompt_ids(tokenizer, p)
        out = candidate(torch.cat([ids, ref[None].to(ids.dtype)], 1))
        logits = getattr(out, "logits", out)[0, ids.shape[1] - 1: ids.shape[1] - 1 + ref.numel()]
        agree.append(prefix_agreement(ref, logits.argmax(-1)))
    return agree


def _awq_inv_scale(gm: fx.GraphModule, lin: fx.Node) -> torch.Tensor | None:
    """The constant 1/s of AWQ's ``mul(x, inv)`` before `lin`, else None."""
    from .ir_weights import constant
    x = lin.args[0]
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.mul.Tensor:
        c = constant(gm, x.args[1])
        if c is not None and c.dim() == 1:
            return c.float()
    return None


@torch.no_grad()
def effective_model(model: torch.nn.Module, cm) -> torch.nn.Module:
    """A deep copy of the HF `model` whose linears hold the weights the compressed IR computes
    with (dequantized weight-only weights; AWQ's input scale folded into the columns)."""
    from ..ir.meta import lineage
    from .ir_weights import linear_weights
    gm = getattr(cm, "graph_module", cm)
    ws, _ = linear_weights(gm)
    out = copy.deepcopy(model).eval()
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        lin = lineage(node)
        path = lin.module_path if lin is not None else None
        lw = ws.get(path)
        inv = _awq_inv_scale(gm, node)
        if lw is None or (not lw.quantized and inv is None):
            continue
        w = torch.from_numpy(lw.dense()).float()
        if inv is not None:
            w = w * inv[None, :]
        mod = out.get_submodule(path)
        mod.weight = torch.nn.Parameter(w.to(mod.weight.dtype), requires_grad=False)
        changed += 1
    if changed == 0:
        raise ValueError("effective_model: the IR has no weight-only linear to transfer")
    return out
