"""Generator.generate: transformers' results and stopping rules, typed errors, streamers."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import InputError
from tests.llm.lms import ids, tiny_lm


@pytest.fixture(scope="module")
def pair():
    model = tiny_lm("llama")
    cm = fxpress.compress(model, (ids(1, 6),))
    return model, fxpress.lower(cm, "eager")


def test_greedy_equals_transformers_generate(pair):
    model, lm = pair
    x = ids(1, 7, seed=3)
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None)
    out = lm.generate(x, max_new_tokens=12, eos_token_id=[])
    assert out.dtype == torch.long and torch.equal(out, ref)


def test_each_row_stops_at_eos_and_is_padded(pair):
    """Batch 2 with left padding: a row whose first new token is made EOS stops there and is
    padded with pad_token_id; the other row equals its own batch-1 run."""
    _, lm = pair
    x = ids(2, 6, seed=5)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    free = lm.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 6])  # row 0's first new token
    out = lm.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 6] == eos and (out[0, 7:] == 0).all()
    alone = lm.generate(x[1:, 2:], max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    n = alone.shape[1] - 4
    assert torch.equal(out[1, 6:6 + n], alone[0, 4:])


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, lm = pair
    x = ids(1, 5)
    a = lm.generate(x, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=1, eos_token_id=[])
    b = lm.generate(x, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=1, eos_token_id=[])
    assert torch.equal(a, b)
    greedy = lm.generate(x, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(lm.generate(x, max_new_tokens=8, do_sample=True, top_k=1, seed=2, eos_token_id=[]),
                       greedy)


def test_a_transformers_streamer_receives_prompt_then_tokens(pair):
    from transformers import TextStreamer

    class Tok:  # the one method TextStreamer calls
        def decode(self, ids, **kw):
            return "".join(f"<{i}>" for i in ids)

    got = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            got.append(text)

    _, lm = pair
    x = ids(1, 4)
    out = lm.generate(x, max_new_tokens=5, streamer=Collect(Tok(), skip_prompt=True), eos_token_id=[])
    assert "".join(got).strip() == "".join(f"<{i}>" for i in out[0, 4:].tolist())


@pytest.mark.parametrize("case,name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), "attention_mask"),
    (dict(input_ids=torch.tensor([[5, 128]])), "input_ids"),
    (dict(input_ids=torch.randint(3, 100, (1, 97))), "input_ids"),        # longer than the cache (96)
    (dict(max_new_tokens=200), "max_new_tokens"),
    (dict(input_ids=torch.rand(1, 3)), "input_ids"),
])
def test_bad_inputs_are_input_errors_naming_them(pair, case, name):
    _, lm = pair
    kw = {"input_ids": ids(1, 5), "max_new_tokens": 3, **case}
    with pytest.raises(InputError) as e:
        lm.generate(**kw)
    assert e.value.input_name == name, str(e.value)


def test_zero_new_tokens_returns_the_prompt(pair):
    _, lm = pair
    x = ids(2, 3)
    assert torch.equal(lm.generate(x, max_new_tokens=0), x)


def test_save_without_a_folder_format_is_a_typed_error_naming_what_to_save(pair, tmp_path):
    """A lowering with no folder format (eager here; Inductor and ORT's generic export alike):
    lm.save(dir, tokenizer=...) is a LoweringError (still a NotImplementedError) that says to keep
    the compressed model with cm.save, and writes nothing."""
    from fxpress.errors import LoweringError
    _, lm = pair
    with pytest.raises(LoweringError, match=r"cm\.save") as e:
        lm.save(tmp_path / "lm", tokenizer=None)
    assert isinstance(e.value, NotImplementedError) and "'llama'" in str(e.value)
    assert not (tmp_path / "lm").exists()


def test_transformers_arguments_users_pass(pair):
    """max_length (prompt + new, as transformers; max_new_tokens wins when both are given) and
    transformers' arguments at their defaults are taken, and a boolean attention_mask; beam search
    and penalties are InputErrors naming the argument (they were all InputErrors)."""
    _, lm = pair
    x = ids(1, 5)
    want = lm.generate(x, max_new_tokens=7, eos_token_id=[])
    assert torch.equal(lm.generate(x, max_length=12, eos_token_id=[]), want)
    assert torch.equal(lm.generate(x, max_length=30, max_new_tokens=7, eos_token_id=[]), want)
    assert torch.equal(lm.generate(x, max_new_tokens=7, eos_token_id=[], num_beams=1, use_cache=True,
                                   repetition_penalty=1.0, num_return_sequences=1, min_new_tokens=None),
                       want)
    assert lm.generate(x, eos_token_id=[]).shape == (1, 25)  # transformers' default: 20 new tokens
    mask = torch.ones_like(x)
    assert torch.equal(lm.generate(x, attention_mask=mask.bool(), max_new_tokens=7, eos_token_id=[]), want)
    for kw, name in ((dict(num_beams=4), "num_beams"), (dict(repetition_penalty=1.3), "repetition_penalty"),
                     (dict(max_length=4), "max_length"), (dict(max_length=97), "max_length"),
                     (dict(foo=None), "foo")):
        with pytest.raises(InputError) as e:
            lm.generate(x, **kw)
        assert e.value.input_name == name, (kw, str(e.value))
