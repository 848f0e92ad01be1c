"""TR-DPO's reference updates (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"):
every few optimizer steps the frozen reference moves towards the policy, ``ref <- alpha * policy + (1 - alpha) *
ref`` (the soft update; ``alpha = 1`` is the hard one), as TRL's ``sync_ref_model`` does."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """``reference <- alpha * policy + (1 - alpha) * reference``, parameter by parameter, matched by name."""
    policy_params = dict(policy.named_parameters())
    reference_params = dict(reference.named_parameters())
    if policy_params.keys() != reference_params.keys():
        missing = sorted(policy_params.keys() ^ reference_params.keys())[:3]
        raise ValueError("model.sync_ref_model: the reference and the policy have different parameters (e.g. "
                         f"{missing}); the reference must be the same architecture as the policy")
    for name, ref in reference_params.items():
        mine = policy_params[name].detach()
        if mine.shape != ref.shape:
            raise ValueError(f"model.sync_ref_model: parameter {name} has shape {tuple(mine.shape)} in the policy "
                             f"and {tuple(ref.shape)} in the reference")
        ref.mul_(1 - alpha).add_(mine.to(ref.dtype), alpha=alpha)
