"""`fxpress generate DIR --prompt ...` streams the saved model's greedy text."""
from __future__ import annotations

import torch

import fxpress
from fxpress.cli import main
from tests.llm.lms import VOCAB, tiny_lm


def _tokenizer():
    """A word-level tokenizer over 'w0' .. 'w127' (ids 0..127), whitespace-separated."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0", eos_token="w2", bos_token="w1")


def test_generate_command_streams_the_greedy_continuation(tmp_path, capsys):
    tok = _tokenizer()
    cm = fxpress.compress(tiny_lm("llama"), (torch.tensor([[5, 6, 7]]),), fxpress.WeightOnly(bits=8))
    lm = fxpress.lower(cm, "onnxruntime")
    folder = lm.save(tmp_path / "lm", tokenizer=tok)
    prompt = "w10 w20 w30 w40"
    want = lm.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=6)
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [f"w{i}" for i in want[0].tolist()]


def test_generate_command_reads_a_generic_decoder_folder(tmp_path, capsys):
    """A family the ORT GenAI writer does not cover (Phi: the generic export) saves fxpress.json +
    model.onnx; the command read only genai_config.json folders (InputError on this one)."""
    tok = _tokenizer()
    cm = fxpress.compress(tiny_lm("phi"), (torch.tensor([[5, 6, 7]]),))
    lm = fxpress.lower(cm, "onnxruntime")
    folder = lm.save(tmp_path / "phi", tokenizer=tok)
    assert not (folder / "genai_config.json").exists()
    prompt = "w10 w20 w30 w40"
    want = lm.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=5)
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "5", "--threads", "1"]) == 0
    assert capsys.readouterr().out.split() == [f"w{i}" for i in want[0].tolist()]
