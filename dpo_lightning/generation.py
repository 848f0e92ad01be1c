"""Batched answers from a chat model: greedy or sampled, left-padded, with a progress bar.

Used by pair building (the model's own answers), the generation probes and the before/after comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jinja2.exceptions import TemplateError  # chat templates are jinja2 (a torch dependency)
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .formats import Messages


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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Answer]] = [[] for _ in prompts]
    bar = tqdm(total=len(order), desc=f"[dpo_lightning] {progress}", disable=not progress, leave=False)
    # a seed fixes the samples without moving the caller's random state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                                 top_k=None, use_cache=True, num_return_sequences=num_return_sequences,
                                 pad_token_id=pad_id, eos_token_id=eos_ids)
            new = out[:, width:].cpu()
            for k, seq in enumerate(new):
                results[idx[k // num_return_sequences]].append(_answer(seq.tolist(), eos_ids, pad_id, tokenizer))
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return results


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
