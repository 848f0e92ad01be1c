"""Greedy generation that drops ended rows between segments gives ``generate``'s own tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.eval.generation import drops_finished_rows, generate_answers, greedy_dropping_finished


@pytest.mark.parametrize("segment,min_rows", [(3, 1), (1, 2), (5, 4), (2, 7), (40, 1)])
def test_dropping_ended_rows_gives_generates_tokens(tiny_model_dir, segment, min_rows):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().eval()  # fp64: no near-tie flips
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (7, 6), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad_width in ((1, 2), (3, 4), (5, 1)):  # left padding, as generate_answers builds it
        ids[row, :pad_width], mask[row, :pad_width] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = model.generate(ids, eos_token_id=None, **kwargs)[:, ids.shape[1]:]  # no row ends
    # as "end of answer", the token whose first occurrences are spread over the most different steps
    eos = max(set(free.flatten().tolist()), key=lambda t: len({row.index(t) for row in free.tolist() if t in row}))
    ends = {row.index(eos) for row in free.tolist() if eos in row}
    assert len(ends) >= 3  # rows end at three different steps at least: rows do leave the batch

    expected = model.generate(ids, eos_token_id=[eos], **kwargs)[:, ids.shape[1]:]
    sizes = []  # rows of each generate call
    real = model.generate
    model.generate = lambda **k: sizes.append(k["input_ids"].shape[0]) or real(**k)
    got = greedy_dropping_finished(model, ids, mask, 12, pad_id=0, eos_ids=[eos], segment=segment,
                                   min_rows=min_rows)
    assert got.tolist() == expected.tolist()  # the same tokens, and pad after each row's end
    assert any(eos in row[:-1] for row in got.tolist())  # some row ended before the budget
    if segment >= 12:
        assert sizes == [7]  # one segment: a plain generate call
    elif min_rows < 7:
        assert sizes[0] == 7 and min_rows <= min(sizes) < 7  # ended rows left, min_rows stayed
    else:
        assert set(sizes) == {7} and len(sizes) > 1  # ended rows stay and write on; their pads must not move


def test_generate_answers_drops_rows_only_when_greedy_and_allowed(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert drops_finished_rows(model)
    model.generation_config.min_new_tokens = 3  # each segment would count it again
    assert not drops_finished_rows(model)
    model.generation_config.min_new_tokens = None
    calls = []
    real = model.generate
    model.generate = lambda **k: calls.append(k.get("return_dict_in_generate", False)) or real(**k)
    prompts = ["hello !", "who are you ?", "what color is the sky ?"]
    generate_answers(model, tokenizer, prompts, max_new_tokens=40, batch_size=3)
    assert calls[0] is True  # greedy: in segments
    calls.clear()
    generate_answers(model, tokenizer, prompts, max_new_tokens=4, do_sample=True, seed=0, num_return_sequences=2)
    assert calls == [False]  # sampling: one plain generate call
