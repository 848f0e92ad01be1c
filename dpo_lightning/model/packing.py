"""Rows of pairs: each pair as one segment ``[prompt, chosen, rejected]``, one pair per row (prefix sharing) or
several pairs packed into one row (packing).

Inside a segment the rejected tokens attend to the prompt and to each other but not to the chosen tokens, and take
the positions right after the prompt, so every response token sees exactly what it sees in its own row of the plain
``(2B, T)`` batch. Packed segments sit one after another; positions restart at 0 in each, and the mask is
block-diagonal: no token attends to another pair's tokens. Padding fills the end of a row; a padding position
attends to the row before it (so no attention row is empty) and no real token attends to it.

Packing places pairs by first fit in order of decreasing length into rows as long as the batch's longest pair, or
of ``row_tokens`` when that pads less (:func:`place_pairs`), so a batch of pairs of mixed lengths runs in fewer
rows. With a dense mask (``sdpa``, ``eager``) attention still costs ``width²`` per row; what packing saves is the
rows, and with them the padding.

Worked example, pairs ``a`` = prompt ``[p0, p1]``, chosen ``[c0]``, rejected ``[r0]`` and ``b`` = prompt ``[q0]``,
chosen ``[d0]``, rejected ``[s0]``, packed into one row of 7 positions (two rows of ``a``'s length would take 8)::

    input_ids     p0 p1 c0 r0 | q0 d0 s0
    position_ids   0  1  2  2 |  0  1  1
    r0 attends to p0 p1 .. r0;  s0 attends to q0 .. s0 (nothing of pair a)
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class SharedLayout(NamedTuple):
    input_ids: Tensor  # (R, L) segments [prompt, chosen, rejected] one after another, right-padded
    position_ids: Tensor  # (R, L) each segment from 0; rejected tokens continue from its prompt's end
    mask: Tensor  # (R, 1, L, L) bool, True where query row may attend key column
    rows: Tensor  # (N,) scored positions: row ...
    cols: Tensor  # (N,) ... and column whose hidden state predicts ...
    targets: Tensor  # (N,) ... this token
    out_index: Tensor  # (N,) response it belongs to: pair i's chosen is i, its rejected B + i
    tokens: Tensor  # (2B,) response lengths, chosen then rejected


class Segment(NamedTuple):
    prompt: int
    chosen: int
    rejected: int

    @property
    def width(self) -> int:
        return self.prompt + self.chosen + self.rejected


def pair_segments(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                  strict: bool = True) -> Optional[list[Segment]]:
    """Each pair's prompt, chosen and rejected lengths in a plain ``(2B, T)`` batch. A pair whose rows start with
    no prompt token (an empty prompt without a BOS token) or with different prompts has no segment: an error, or
    None when not ``strict``."""
    n_pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(-1).tolist()  # (2B,) prompt + response
    responses = loss_mask.sum(-1).tolist()  # (2B,)
    segments = []
    for i in range(n_pairs):
        prompt, chosen, rejected = lengths[i] - responses[i], responses[i], responses[n_pairs + i]
        if prompt == 0 or lengths[n_pairs + i] - rejected != prompt or not torch.equal(input_ids[i, :prompt],
                                                                        input_ids[n_pairs + i, :prompt]):
            if not strict:
                return None
            raise ValueError(f"prefix sharing: pair {i} of the batch has no prompt token or different prompts in "
                             "its chosen and rejected rows; turn model.prefix_sharing and model.packing off for this "
                             "data")
        segments.append(Segment(prompt, chosen, rejected))
    return segments


def place_pairs(widths: Sequence[int], row_tokens: Optional[int] = None) -> list[tuple[int, int]]:
    """``(row, offset)`` of each pair: first fit, longest pair first (ties in batch order), into rows as long as the
    longest pair, or of ``row_tokens`` when that lays the batch out in fewer positions (rows x the fullest row):
    pairs of similar lengths fill long rows unevenly, and then rows of the longest pair pad less."""
    longest = max(widths, default=0)
    candidates = [first_fit(widths, longest)]
    if row_tokens and row_tokens > longest:
        candidates.append(first_fit(widths, row_tokens))
    return min(candidates, key=lambda placement: rows_times_width(placement, widths))


def first_fit(widths: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    """``(row, offset)`` of each pair, placed longest first into the first row of ``capacity`` with room."""
    filled: list[int] = []  # tokens used in each row so far
    placement: list[tuple[int, int]] = [(0, 0)] * len(widths)
    for i in sorted(range(len(widths)), key=lambda k: -widths[k]):
        row = next((r for r, used in enumerate(filled) if used + widths[i] <= capacity), len(filled))
        if row == len(filled):
            filled.append(0)
        placement[i] = (row, filled[row])
        filled[row] += widths[i]
    return placement


def row_shape(placement: Sequence[tuple[int, int]], widths: Sequence[int]) -> tuple[int, int]:
    """``(rows, width)`` of a placement: its rows, and its fullest row, which every row is padded to."""
    n_rows = max((row for row, _ in placement), default=-1) + 1
    return n_rows, max((offset + w for (_, offset), w in zip(placement, widths)), default=0)


def rows_times_width(placement: Sequence[tuple[int, int]], widths: Sequence[int]) -> int:
    """Positions a placement runs over, padding included."""
    n_rows, width = row_shape(placement, widths)
    return n_rows * width


def row_layout(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, packing: bool = False,
               row_tokens: Optional[int] = None, pad_token_id: int = 0,
               segments: Optional[list[Segment]] = None) -> SharedLayout:
    """Rebuild a plain :class:`~dpo_lightning.data.collate.PreferenceBatch` as rows of ``[prompt, chosen,
    rejected]`` segments: one pair per row, or with ``packing`` placed by :func:`place_pairs` into rows of
    ``row_tokens``.

    Args:
        input_ids: (2B, T) chosen rows then rejected rows, right-padded; each row is prompt then response.
        attention_mask: (2B, T)
        loss_mask: (2B, T) 1 on response tokens.
        segments: the batch's :func:`pair_segments`, when the caller has them already.
    """
    segments = segments if segments is not None else pair_segments(input_ids, attention_mask, loss_mask)
    n_pairs, device = len(segments), input_ids.device
    placement = (place_pairs([s.width for s in segments], row_tokens) if packing
                 else [(i, 0) for i in range(n_pairs)])
    n_rows, width = row_shape(placement, [s.width for s in segments])
    ids = torch.full((n_rows, width), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.arange(width, device=device).repeat(n_rows, 1)
    segment = torch.full((n_rows, width), -1, dtype=torch.long, device=device)  # pair index, -1 on padding
    part = torch.zeros((n_rows, width), dtype=torch.long, device=device)  # 1 on chosen, 2 on rejected tokens
    rows, cols, targets, out_index = [], [], [], []
    for i, ((row, o), (p, c, r)) in enumerate(zip(placement, segments)):
        ids[row, o:o + p + c] = input_ids[i, :p + c]
        ids[row, o + p + c:o + p + c + r] = input_ids[n_pairs + i, p:p + r]
        positions[row, o:o + p + c] = torch.arange(p + c, device=device)
        positions[row, o + p + c:o + p + c + r] = torch.arange(p, p + r, device=device)
        segment[row, o:o + p + c + r] = i
        part[row, o + p:o + p + c], part[row, o + p + c:o + p + c + r] = 1, 2
        chosen_cols = list(range(o + p - 1, o + p + c - 1))
        rejected_cols = ([o + p - 1] + list(range(o + p + c, o + p + c + r - 1))) if r else []
        rows += [row] * (c + r)
        cols += chosen_cols + rejected_cols
        targets += list(range(o + p, o + p + c + r))  # column of each scored token in ``ids``
        out_index += [i] * c + [n_pairs + i] * r
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # (L, L)
    same_pair = segment[:, :, None] == segment[:, None, :]  # (R, L, L)
    rejected_sees_chosen = (part[:, :, None] == 2) & (part[:, None, :] == 1)
    padding_query = (segment == -1)[:, :, None]
    mask = (causal & ((same_pair & ~rejected_sees_chosen) | padding_query))[:, None]  # (R, 1, L, L)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    targets_t = ids[rows_t, torch.tensor(targets, dtype=torch.long, device=device)]
    return SharedLayout(ids, positions, mask, rows_t, torch.tensor(cols, dtype=torch.long, device=device), targets_t,
                        torch.tensor(out_index, dtype=torch.long, device=device), loss_mask[:, 1:].sum(-1))
