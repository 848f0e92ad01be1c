"""Token log-probs under a linear LM head that keep no logits for the backward pass.

Autograd through ``log_softmax(h @ W.T)`` keeps every chunk's ``(N, V)`` logits until the backward pass, however
the head is chunked: ``N`` scored positions times the vocabulary, 4 bytes each (0.2 GB for 1,000 positions of
SmolLM2's 49k vocabulary, 0.6 GB with Qwen2.5's 152k), then as much again for their gradient. This function keeps
the hidden states and one log-normaliser per position instead, and computes each chunk's logits again in the
backward pass, one chunk at a time: one more head matmul per position, the price gradient checkpointing pays for
the decoder layers.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..losses import upcast


class ChunkStats:
    """Per-position figures of one chunk's logits, taken without gradient; each list holds (n,) tensors."""

    def __init__(self, token_stats: bool) -> None:
        self.token_stats = token_stats
        self.logit_means: list[Tensor] = []
        self.entropies: list[Tensor] = []
        self.top1s: list[Tensor] = []
        self.wpo_logps: list[Tensor] = []

    @torch.no_grad()
    def add(self, logits: Tensor, log_z: Tensor, logps: Tensor, target: Tensor) -> None:
        """logits (n, V) fp32, log_z (n,), logps (n,) and target (n,) of one chunk."""
        logits, log_z, logps = logits.detach(), log_z.detach(), logps.detach()
        self.logit_means.append(logits.mean(-1))
        if self.token_stats:
            # one (n, V) softmax: H = log Z - sum_v p z (einsum, a batched matmul: 2-3x faster on CPU than
            # (p * z).sum(-1)), and log sum_v p^2 = 2 log |p| (the norm: 5x faster than einsum, 6x closer to fp64)
            probs = torch.softmax(logits, dim=-1)
            self.entropies.append(log_z - torch.einsum("nv,nv->n", probs, logits))
            self.top1s.append((logits.argmax(-1) == target).to(logits.dtype))
            self.wpo_logps.append(logps - 2 * torch.linalg.vector_norm(probs, dim=-1).log())


def chunked_logps(logits_of: Callable[[Tensor], Tensor], h: Tensor, targets: Tensor, chunk_size: int,
                  stats: ChunkStats) -> tuple[Tensor, Tensor]:
    """Log-probs of ``targets`` and the log-normalisers, ``chunk_size`` positions at a time; each chunk's figures go
    to ``stats``. ``logits_of`` maps a chunk of ``h`` (n, H) to its fp32 logits (n, V); ``targets`` (N,).

    Returns (N,) log-probs and (N,) log-normalisers.
    """
    logps, log_zs = [], []
    for start in range(0, h.shape[0], chunk_size):
        logits = logits_of(h[start:start + chunk_size])  # (n, V)
        target = targets[start:start + chunk_size]  # (n,)
        log_zs.append(torch.logsumexp(logits, dim=-1))  # (n,)
        logps.append(logits.gather(-1, target[:, None]).squeeze(-1) - log_zs[-1])  # (n,)
        stats.add(logits, log_zs[-1], logps[-1], target)
        del logits
    if not logps:
        empty = h.new_zeros(0, dtype=upcast(h).dtype)
        return empty, empty
    return torch.cat(logps), torch.cat(log_zs)


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(n, V) fp32 logits of hidden states h (n, H), in the dtype autocast gives the matmul."""
    return upcast(torch.nn.functional.linear(h, weight, bias))


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int,
                stats: ChunkStats) -> Tensor:
        logps, log_z = chunked_logps(lambda x: _logits(x, weight, bias), h, targets, chunk_size, stats)
        device = h.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(h, weight, bias, targets, log_z)
        return logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        h, weight, bias, targets, log_z = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        need_h, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=upcast(weight).dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=upcast(bias).dtype) if need_bias else None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for start in range(0, h.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                h_chunk = h[start:end]
                grad = _logits(h_chunk, weight, bias)  # (n, V) logits, turned in place into their gradient:
                grad.sub_(log_z[start:end, None]).exp_()  # softmax p
                grad[torch.arange(grad.shape[0], device=grad.device), targets[start:end]] -= 1  # p - onehot
                grad.mul_(-grad_logps[start:end, None])  # d logp / d logits = onehot - p, times the upstream grad
                grad = grad.to(torch.promote_types(h.dtype, weight.dtype)) if not enabled else \
                    grad.to(dtype)  # the matmuls in the dtype the forward's head ran in
                if need_h:
                    grad_h[start:end] = grad @ weight.to(grad.dtype)
                if need_weight:
                    grad_weight += grad.T @ h_chunk.to(grad.dtype)
                if need_bias:
                    grad_bias += grad.sum(0)
                del grad
        return (grad_h, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def linear_logps(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int,
                 stats: ChunkStats) -> Tensor:
    """Log-probs of ``targets`` under ``log_softmax(h @ weight.T + bias)``, in fp32, the head run in chunks of
    ``chunk_size`` positions in both passes; the chunks' figures go to ``stats``.

    Args:
        h: (N, H) hidden states of the scored positions.
        weight: (V, H) the head's weight; bias: (V,) or None.
        targets: (N,) the token each position predicts.

    Returns (N,) log-probs.
    """
    return _LinearLogps.apply(h, weight, bias, targets, chunk_size, stats)
