"""Optional ``torch.compile`` of the decoder layers (regional compilation, as PyTorch recommends for LLMs).

Each decoder layer is compiled on its own, with dynamic shapes: one compilation serves every layer and every
sequence length, and the rest of the model (embeddings, the chunked LM head, prefix-sharing layouts) stays eager.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .logprobs import unwrapped


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose class the model names in ``_no_split_modules`` (its decoder layer), outermost only."""
    base = unwrapped(model)
    classes = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in classes]


def compile_decoder_layers(model: nn.Module, backend: Optional[str] = None, mode: Optional[str] = None) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"model.torch_compile: {type(model).__name__} names no decoder layer class in "
                         "_no_split_modules, so there is nothing to compile; turn torch_compile off")
    for layer in layers:
        layer.compile(backend=backend or "inductor", mode=mode, dynamic=True)
    return len(layers)
