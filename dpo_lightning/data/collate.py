"""The batch contract: tokenized pairs -> one ``(2B, T)`` :class:`PreferenceBatch`, and the padding it is built on."""

from __future__ import annotations

from typing import Optional, Sequence, TypedDict

import torch
from torch import Tensor

try:
    from typing import NotRequired
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired

REF_KEY = "ref_logps"  # batch key of precomputed reference log-probs (training/reference_cache.py)


class PreferenceBatch(TypedDict):
    """The one batch contract. ``B`` pairs; chosen rows ``[:B]``, rejected rows ``[B:]``."""

    input_ids: Tensor  # (2B, T) prompt + response, right-padded with pad_token_id
    attention_mask: Tensor  # (2B, T) 1 on real tokens
    loss_mask: Tensor  # (2B, T) 1 on response tokens: the tokens whose log-probs are summed
    ref_logps: NotRequired[Tensor]  # (2B,) precomputed reference log-probs, chosen then rejected


def pad_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int, left: bool = False,
                  multiple_of: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(N, T)`` token ids padded to the longest sequence (rounded up to ``multiple_of``), and the ``(N, T)``
    attention mask, 1 on real tokens. Right padding for training, ``left`` for generation."""
    width = max((len(s) for s in sequences), default=0)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        input_ids[i, span] = torch.tensor(list(sequence), dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def completion_batch(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                     multiple_of: Optional[int] = None) -> PreferenceBatch:
    """Right-padded ``(prompt, completion)`` rows with a loss mask over the completion tokens, ``(N, T)`` each."""
    input_ids, attention_mask = pad_sequences([list(p) + list(c) for p, c in rows], pad_token_id,
                                              multiple_of=multiple_of)
    positions = torch.arange(input_ids.shape[1])
    prompt_lengths = torch.tensor([len(p) for p, _ in rows], dtype=torch.long)
    loss_mask = (positions[None, :] >= prompt_lengths[:, None]).long() * attention_mask
    return PreferenceBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


class PreferenceCollator:
    """Pads tokenized pairs into one :class:`PreferenceBatch`.

    Worked example, ``pad_token_id=0``::

        >>> collate = PreferenceCollator(pad_token_id=0)
        >>> batch = collate([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        ...                  {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}])
        >>> batch["input_ids"].tolist()
        [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
        >>> batch["attention_mask"].tolist()
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
        >>> batch["loss_mask"].tolist()
        [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]

    A pair that carries ``ref_logps`` (``[chosen, rejected]``, attached by the data module when the reference
    log-probs are precomputed) adds ``batch["ref_logps"]`` of shape ``(2B,)`` when every pair of the batch has them.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> PreferenceBatch:
        rows = [(e["prompt_ids"], e[side]) for side in ("chosen_ids", "rejected_ids") for e in examples]
        batch = completion_batch(rows, self.pad_token_id, self.pad_to_multiple_of)
        if all(REF_KEY in e for e in examples):
            batch[REF_KEY] = torch.tensor([e[REF_KEY][side] for side in (0, 1) for e in examples])
        return batch
