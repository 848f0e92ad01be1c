"""``ThroughputTelemetry``: what each optimizer step moved and how fast, to the loggers and the progress bar.

Per optimizer step (all micro-batches of gradient accumulation, all ranks), logged under ``throughput/``:

- ``pairs_per_sec``: preference pairs trained per second.
- ``tokens_per_sec``: the pairs' own tokens per second, each prompt counted once with both responses, no padding:
  the same count whichever layout ran, so it compares layouts and trainers.
- ``padding_share``: share of the positions the policy ran over that were padding, in the layout that ran
  (two rows per pair, one shared row per pair with ``model.prefix_sharing``, or packed rows with
  ``model.packing``).
- ``step_time``: seconds from the end of the previous optimizer step (or the first batch of the run) to the end
  of this one, data loading included, validation excluded.
- ``mfu`` (when the device's peak is known): model FLOPs utilisation, the step's model FLOPs over the time
  and the devices' peak. Model FLOPs per token are ``6 N`` for a policy of ``N`` trained parameters (forward
  ``2 N``, backward ``4 N``), ``4 N`` for a frozen base under LoRA (its weights get no gradients), plus ``2 N``
  for a reference forward that runs during training (not when its log-probs are precomputed); attention's own
  FLOPs are left out, as in the usual ``6 N`` estimate.

When training ends, a one-line summary on rank 0: mean pairs/s and tokens/s, and the tokens/s of the first and the
last ten steps. When the last ten ran more than 1.3x slower, a warning says so with what the machine reported over
the run: the CPU time its hypervisor withheld (steal) and the load average, since a host that gives the process less
CPU (other jobs, a throttled burstable VM) slows every step alike.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..model.packing import place_pairs, rows_times_width

SUMMARY_STEPS = 10  # steps at the start and at the end of the run that the closing summary compares
SLOWDOWN = 1.3  # the end of the run this many times slower than its start draws a warning


def host_cpu() -> Optional[tuple[int, int]]:
    """(steal, total) CPU time of the whole machine since boot, in clock ticks (Linux ``/proc/stat``); None
    elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def layout_counts(attention_mask: Tensor, loss_mask: Tensor, shared: bool, packed: bool = False,
                  row_tokens: Optional[int] = None) -> Tensor:
    """``(4,)`` float64 on the batch's device: ``pairs, tokens, filled, positions`` of a ``(2B, T)`` batch. Its
    pairs; their own tokens (prompt once, both responses); and of the positions the policy runs over, those holding
    a token and all of them. Plain layout: ``2B x T`` positions, each prompt filling two rows. Prefix sharing:
    ``B x L``, one ``[prompt, chosen, rejected]`` row per pair, ``L`` the longest such row. Packed
    (``model/packing.py``): rows x the fullest row. Read without a device sync, except when packed: the placement
    needs the lengths on the host, as the packed step itself does."""
    n_pairs = attention_mask.shape[0] // 2
    lengths = attention_mask.sum(-1)  # (2B,) prompt + response
    per_pair = lengths[:n_pairs] + loss_mask[n_pairs:].sum(-1)  # (B,) prompt + chosen + rejected
    tokens = per_pair.sum()
    if packed:
        widths = per_pair.tolist()
        filled, positions = tokens, torch.full_like(tokens, rows_times_width(place_pairs(widths, row_tokens), widths))
    elif shared:
        filled, positions = tokens, per_pair.max() * n_pairs
    else:
        filled, positions = lengths.sum(), torch.full_like(tokens, attention_mask.numel())
    return torch.stack([torch.full_like(tokens, n_pairs), tokens, filled, positions]).double()


def flops_per_token(module: LightningModule) -> int:
    """Model FLOPs per pair token of one training step (module docstring): the policy's forward and backward, and
    the reference's forward when it runs during training."""
    policy = getattr(module, "policy", None) or module
    total = sum(p.numel() for p in policy.parameters())
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    flops = 6 * trained + 4 * (total - trained)
    reference = getattr(module, "reference", None)
    source = getattr(reference, "source", None)
    if source == "model":
        flops += 2 * sum(p.numel() for p in reference.model.parameters())
    elif source == "adapters_off":  # LoRA: the policy with its adapters off
        flops += 2 * total
    return flops


class ThroughputTelemetry(Callback):
    """Pairs/s, tokens/s, padding share, step time and (on CUDA) MFU of every optimizer step, logged to the
    loggers under ``throughput/`` every ``trainer.log_every_n_steps`` steps and shown in the progress bar.

    Args:
        enabled: set to false to log nothing.
        peak_tflops: one device's peak dense TFLOP/s in the training precision, for ``throughput/mfu``; when unset,
            Lightning's table of known CUDA devices (A100, H100, H200, L4, ...) is used. No MFU when neither knows it.
    """

    def __init__(self, enabled: bool = True, peak_tflops: Optional[float] = None) -> None:
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"throughput.peak_tflops must be positive, got {peak_tflops}")
        self.enabled, self.peak_tflops = enabled, peak_tflops
        self.peak_flops: Optional[float] = None
        self.history: list[dict[str, float]] = []  # the figures of each optimizer step of the run
        self._pending: Optional[Tensor] = None  # layout_counts of the step so far
        self._start: Optional[float] = None
        self._stepped = False
        self._flops_per_token: Optional[int] = None
        self._host_start: Optional[tuple[int, int]] = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.peak_flops = self.peak_tflops * 1e12 if self.peak_tflops else None
        device = trainer.strategy.root_device
        if self.peak_flops is None and device.type == "cuda":
            self.peak_flops = get_available_flops(device, compute_dtype(trainer.precision))
        self.history, self._start, self._flops_per_token, self._pending = [], None, None, None
        self._host_start = host_cpu()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        shared, packed = bool(getattr(pl_module, "share_prefix", False)), bool(getattr(pl_module, "packs", False))
        row_tokens = getattr(getattr(pl_module, "hparams", None), "packing_row_tokens", None)
        counts = layout_counts(batch["attention_mask"], batch["loss_mask"], shared, packed, row_tokens)
        self._pending = counts if self._pending is None else self._pending + counts
        if not self._stepped:  # gradient accumulation: the step is not over
            return
        self._stepped = False
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, self._start = max(now - (self._start or now), 1e-9), now
        counts = self._pending.to(trainer.strategy.root_device)
        pairs, tokens, filled, positions = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        self._pending = None
        figures = {"pairs_per_sec": pairs / seconds, "tokens_per_sec": tokens / seconds,
                   "padding_share": 1.0 - filled / positions, "step_time": seconds}
        if self.peak_flops:
            if self._flops_per_token is None:
                self._flops_per_token = flops_per_token(pl_module)
            figures["mfu"] = self._flops_per_token * tokens / (seconds * self.peak_flops * trainer.world_size)
        self.history.append({"pairs": pairs, "tokens": tokens, "filled": filled, "positions": positions, **figures})
        pl_module.log("pairs/s", figures["pairs_per_sec"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        pl_module.log("tok/s", figures["tokens_per_sec"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        step = trainer.global_step - 1  # Lightning has counted this step already
        if step % max(1, trainer.log_every_n_steps) == 0:
            for logger in trainer.loggers:
                logger.log_metrics({f"throughput/{k}": v for k, v in figures.items()}, step=step)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = None  # the next step is timed from its own first batch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or not self.history:
            return
        pairs, tokens, seconds = (sum(step[k] for step in self.history) for k in ("pairs", "tokens", "step_time"))
        first, last = (rate(self.history[part]) for part in (slice(SUMMARY_STEPS), slice(-SUMMARY_STEPS, None)))
        rank_zero_info(f"[dpo_lightning] throughput: {pairs / seconds:.3g} pairs/s, {tokens / seconds:.4g} tokens/s "
                       f"over {len(self.history)} steps; {first:.4g} tokens/s in the first {SUMMARY_STEPS}, "
                       f"{last:.4g} in the last {SUMMARY_STEPS}")
        if len(self.history) >= 2 * SUMMARY_STEPS and first > SLOWDOWN * last:
            rank_zero_warn(f"[dpo_lightning] the last {SUMMARY_STEPS} steps ran {first / last:.1f}x slower than the "
                           f"first {SUMMARY_STEPS} (tokens/s). {host_report(self._host_start)}")


def rate(steps: list[dict[str, float]]) -> float:
    """Tokens per second over ``steps``."""
    return sum(s["tokens"] for s in steps) / max(sum(s["step_time"] for s in steps), 1e-9)


def host_report(start: Optional[tuple[int, int]]) -> str:
    """What the machine reported over the run: CPU steal and the load average (Linux), to tell a slower machine
    from a slower step."""
    end = host_cpu()
    if start is None or end is None or end[1] <= start[1]:
        return "The machine reports no CPU accounting here."
    steal = (end[0] - start[0]) / (end[1] - start[1])
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    return (f"Over the run the hypervisor withheld {steal:.1%} of the machine's CPU time (steal); load average now "
            f"{load} on {os.cpu_count()} CPUs. Other jobs on the machine or a throttled VM slow every step alike.")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype most matmuls run in under a Lightning precision setting."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32
