"""Batched answers from a chat model: greedy or sampled, left-padded, with a progress bar.

Used by pair building (the model's own answers), the generation probes and the before/after comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jinja2.exceptions import TemplateError  # chat templates are jinja2 (a torch dependency)
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..data.collate import pad_sequences
from ..data.formats import Messages
from ..model.loading import pad_token_id

DROP_SEGMENT = 16  # new tokens per generate call between drops of ended rows (greedy_dropping_finished)
MIN_ROWS = 12  # rows that stay in a batch at least, so that a row's arithmetic does not depend on the batch
# generate's cache argument and output field: ``past_key_values`` until transformers 5.23, ``cache`` from 5.24
CACHE_NAME = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class Answer:
    """One generated answer: its text, and whether it ended with EOS before ``max_new_tokens`` ran out."""

    text: str
    finished: bool
    num_tokens: int


def chat_messages(question: str, system_prompt: Optional[str]) -> Messages:
    """The conversation for one question; no system message when ``system_prompt`` is None, so the chat
    template's own default (if it has one) applies."""
    messages: Messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return messages + [{"role": "user", "content": question}]


def system_label(system_prompt: Optional[str], width: int = 40) -> str:
    """A short printable name of a system message: ``template default``, ``empty`` or its quoted start."""
    if system_prompt is None:
        return "template default"
    if not system_prompt.strip():
        return "empty"
    text = " ".join(system_prompt.split())
    return repr(text if len(text) <= width else text[:width - 1] + "…")


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The prompt text exactly as training sees it: the chat template with the assistant turn opened."""
    if tokenizer.chat_template is None:
        return "\n".join(m["content"] for m in messages) + "\n"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:  # e.g. Gemma's template on a system message
        roles = [m["role"] for m in messages]
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} refused a conversation with roles {roles}: "
                         f"{error}" + (" (set the system prompt to null)" if "system" in roles else "")) from error


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     max_new_tokens: int = 128, batch_size: int = 16, num_return_sequences: int = 1,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: Optional[int] = None, progress: str = "") -> list[list[Answer]]:
    """Answer each rendered prompt; returns ``num_return_sequences`` answers per prompt, in prompt order.

    Prompts are sorted by length and left-padded in batches, so padding stays small; ``progress`` is the
    label of a progress bar (none when empty).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    # a rendered chat template holds its special tokens; plain text gets them as training's plain layout does
    encoded = [tokenizer(p, add_special_tokens=tokenizer.chat_template is None)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Answer]] = [[] for _ in prompts]
    bar = tqdm(total=len(order), desc=f"[dpo_lightning] {progress}", disable=not progress, leave=False)
    # a seed fixes the samples without moving the caller's random state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_sequences([encoded[i] for i in idx], pad_id, left=True)
            width = ids.shape[1]
            if do_sample or num_return_sequences > 1 or not drops_finished_rows(model):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None,
                                     top_p=top_p if do_sample else None, top_k=None, use_cache=True,
                                     num_return_sequences=num_return_sequences, pad_token_id=pad_id,
                                     eos_token_id=eos_ids)
                new = out[:, width:].cpu()
            else:
                new = greedy_dropping_finished(model, ids.to(device), mask.to(device), max_new_tokens, pad_id,
                                               eos_ids).cpu()
            for k, seq in enumerate(new):
                results[idx[k // num_return_sequences]].append(_answer(seq.tolist(), eos_ids, pad_id, tokenizer))
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return results


def drops_finished_rows(model: PreTrainedModel) -> bool:
    """Whether greedy answers may be generated in segments (``greedy_dropping_finished``): not when the generation
    config counts a minimum length (each segment would count it again) or asks for a cache other than the
    dynamic one."""
    config = model.generation_config
    return config is None or (not getattr(config, "min_length", 0) and not getattr(config, "min_new_tokens", None)
                              and getattr(config, "cache_implementation", None) in (None, "dynamic"))


@torch.no_grad()
def greedy_dropping_finished(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                             pad_id: int, eos_ids: list[int], segment: int = DROP_SEGMENT,
                             min_rows: int = MIN_ROWS) -> Tensor:
    """Greedy ``generate`` in segments of ``segment`` new tokens; between segments the rows that have ended leave
    the batch and the model's cache, so the remaining steps run only on rows still writing. Returns (B, N) new
    tokens, ``N <= max_new_tokens``, pad after each row's end, as ``generate`` returns them.

    Decoding a small model is step-bound (SmolLM2-135M on 2 CPU cores: about 80 ms a step plus 2.7 ms a row), and a
    batch runs until its longest answer ends: on the demo's 105 anchor questions, half of which run to the budget,
    dropping the others took 68.5 s instead of 88.0 s. Rows leave only while at least ``min_rows`` stay: a linear
    layer's rows are bitwise the same whatever the batch for 12 rows or more on the CPU kernels measured, not for
    fewer, and the answers should not depend on which rows ended. Each continuation hands ``generate`` its own
    cache, so the tokens are those of one uninterrupted call.

    Args:
        input_ids, attention_mask: (B, T) left-padded prompts.
        eos_ids: tokens that end an answer.
    """
    rows, device = input_ids.shape[0], input_ids.device
    new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # the input row of each batch row
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, device=device)
    ids, mask, cache, done = input_ids, attention_mask, None, 0
    while done < max_new_tokens:
        n = min(segment, max_new_tokens - done)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None, use_cache=True, pad_token_id=pad_id,
                             eos_token_id=eos_ids, return_dict_in_generate=True, **{CACHE_NAME: cache})
        tokens = out.sequences[:, ids.shape[1]:]  # (rows still in the batch, <= n)
        writing = ~ended[live]  # rows kept after their end (min_rows) write on past it: keep their pads
        new[live[writing], done:done + tokens.shape[1]] = tokens[writing]
        ended[live] |= torch.isin(tokens, eos).any(dim=1)
        done += tokens.shape[1]
        if tokens.shape[1] < n or bool(ended[live].all()):  # generate stopped early: every row has ended
            break
        ids, mask, cache = out.sequences, torch.cat([mask, mask.new_ones(tokens.shape)], dim=1), out[CACHE_NAME]
        keep = (~ended[live]).nonzero().squeeze(1)
        if min_rows <= len(keep) < len(live):
            cache.reorder_cache(keep)
            ids, mask, live = ids[keep], mask[keep], live[keep]
    return new[:, :done]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _answer(tokens: list[int], eos_ids: list[int], pad_id: int, tokenizer: PreTrainedTokenizerBase) -> Answer:
    cut = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
    body = tokens if cut is None else tokens[:cut]
    return Answer(tokenizer.decode(body, skip_special_tokens=True).strip(), finished=cut is not None,
                  num_tokens=len(body))
