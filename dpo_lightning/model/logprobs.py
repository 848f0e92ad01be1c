"""Response log-probs of a causal LM on a :class:`~dpo_lightning.data.collate.PreferenceBatch`.

The LM head runs on response positions only, in chunks: the ``(2B, T, V)`` logits are never built, which
matters for 150k-token vocabularies. Log-softmax is computed in fp32 whatever the model's dtype. Models whose
logits are not ``lm_head(last_hidden_state)`` (final-logit soft-capping, logit scaling; see ``plain_head``) take
the plain path through their own logits.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from ..losses import upcast
from .linear_head import ChunkStats, chunked_logps, linear_logps


class TokenStats(NamedTuple):
    """Per-response sums over response tokens of what TRL logs or weights by; no gradient. Each (2B,)."""
    entropy: Tensor  # entropy of the next-token distribution (TRL's ``entropy``)
    top1: Tensor  # tokens that are the distribution's first argmax (TRL's ``mean_token_accuracy``)
    wpo_logps: Tensor  # log p(token) - log sum_v p_v^2 (WPO's aligned log-probs, Zhou et al. 2024, Eq. 2)


class ResponseLogps(NamedTuple):
    logps: Tensor  # (2B,) summed log-probs of each response
    tokens: Tensor  # (2B,) response lengths
    logit_sums: Tensor  # (2B,) sum over response positions of the vocabulary-mean logit (TRL's logits/*)
    aux_loss: Optional[Tensor] = None  # () mixture-of-experts router load-balancing loss, when asked for
    stats: Optional[TokenStats] = None  # when asked for (``token_stats``)
    unweighted_logps: Optional[Tensor] = None  # (2B,) plain sums, when ``logps`` carry LD-DPO's weights


# config attributes of Hugging Face models whose logits are not lm_head(hidden): soft-capping (Gemma 2/3), scales
# and multipliers (Cohere, Granite, HyperCLOVA X, Falcon-H1, ...)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_multiplier", "output_multiplier_scale")
_PLAIN_HEAD: WeakKeyDictionary = WeakKeyDictionary()  # model -> plain_head's answer, checked once


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are ``lm_head(last hidden state)``, so the head can run on response positions
    only: no logit transform named in its config, and, checked once per model on four tokens, its own logits
    agree (modelling code from a repository may transform them without a config entry)."""
    if model not in _PLAIN_HEAD:
        config = getattr(model, "config", None)
        named = any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in LOGIT_TRANSFORMS)
        structured = model.get_output_embeddings() is not None and hasattr(model, "base_model")
        _PLAIN_HEAD[model] = not named and structured and _head_gives_the_logits(model)
    return _PLAIN_HEAD[model]


def _head_gives_the_logits(model: nn.Module) -> bool:
    """``lm_head(hidden)`` equals the model's own logits on four tokens (eval mode, no grad)."""
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device)[None] % model.get_output_embeddings().weight.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            head = model.get_output_embeddings()(hidden_states(model, input_ids=ids))
    finally:
        model.train(was_training)
    return logits.shape == head.shape and torch.allclose(upcast(head), upcast(logits), rtol=1e-3, atol=1e-4)


def response_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                   chunk_size: int = 1024, router_aux: bool = False, token_stats: bool = False,
                   ld_alpha: Optional[float] = None) -> ResponseLogps:
    """Forward ``model`` once on the whole ``(2B, T)`` batch and reduce to per-response sums.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (or a PEFT wrapper of one).
        input_ids: (2B, T)
        attention_mask: (2B, T)
        loss_mask: (2B, T) 1 on response tokens.
        chunk_size: response positions per LM-head chunk.
        router_aux: also return the mixture-of-experts router's load-balancing loss over the batch's tokens, as
            the model's own forward computes it (``output_router_logits``).
        token_stats: also return :class:`TokenStats`.
        ld_alpha: LD-DPO's weight of the response tokens past the shorter response of the pair (see ``head_logps``).
    """
    target_mask = loss_mask[:, 1:].bool()  # (2B, T-1): position t predicts token t + 1
    rows, cols = target_mask.nonzero(as_tuple=True)  # (N,) each: positions that predict response tokens
    args = (rows, cols, input_ids[rows, cols + 1], rows, input_ids.shape[0], chunk_size, target_mask.sum(-1))
    if not plain_head(model):  # the model's own logits, gathered at the scored positions
        router = {"output_router_logits": True} if router_aux else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **router)
        return head_logps(nn.Identity(), out.logits, *args, token_stats=token_stats, ld_alpha=ld_alpha)._replace(
            aux_loss=out.aux_loss if router_aux else None)
    aux_loss = None
    if router_aux:
        hidden, aux_loss = hidden_states_and_router_aux(model, input_ids, attention_mask)
    else:
        hidden = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    return head_logps(model.get_output_embeddings(), hidden, *args, token_stats=token_stats,
                      ld_alpha=ld_alpha)._replace(aux_loss=aux_loss)


def backbone(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (through a PEFT wrapper too)."""
    return unwrapped(model).base_model


def hidden_states(model: nn.Module, **inputs: Tensor) -> Tensor:
    """``(rows, T, H)`` last hidden states of the model's backbone (no LM head)."""
    return backbone(model)(**inputs, use_cache=False).last_hidden_state


def hidden_states_and_router_aux(model: nn.Module, input_ids: Tensor,
                                 attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, T, H)`` last hidden states and the router's load-balancing loss ``()``, from one forward of the
    whole model, which computes that loss from its router logits itself: a hook keeps the backbone's output, and
    the model builds the logits of the last position only (``logits_to_keep``) where its forward takes that."""
    kept: list[Tensor] = []
    hook = backbone(model).register_forward_hook(lambda module, args, out: kept.append(out.last_hidden_state))
    last_only = {"logits_to_keep": 1} if _takes_logits_to_keep(type(unwrapped(model))) else {}
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_router_logits=True,
                    **last_only)
    finally:
        hook.remove()
    return kept[-1], out.aux_loss


def router_aux_coef(model: nn.Module, coef: Optional[float]) -> float:
    """The weight of the router load-balancing loss, as TRL chooses it: ``coef`` when set, else the model config's
    ``router_aux_loss_coef`` (0 when it declares none); only mixture-of-experts models return that loss."""
    config = unwrapped(model).config.get_text_config()
    is_moe = hasattr(config, "output_router_logits")
    if coef and not is_moe:
        raise ValueError(f"model.loss.router_aux_loss_coef is {coef}, but {type(unwrapped(model)).__name__} is not a "
                         "mixture-of-experts model that returns its router logits: there is no load-balancing loss "
                         "to weight")
    if not is_moe:
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)


def unwrapped(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper; the model itself otherwise."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def head_logps(head: Callable[[Tensor], Tensor], hidden: Tensor, rows: Tensor, cols: Tensor, targets: Tensor,
               out_index: Tensor, n_out: int, chunk_size: int, tokens: Tensor, token_stats: bool = False,
               ld_alpha: Optional[float] = None) -> ResponseLogps:
    """Run the LM head on the hidden states at ``(rows, cols)`` only, in chunks, and sum the log-probs of
    ``targets`` into response ``out_index``.

    Args:
        head: the output layer, e.g. ``model.get_output_embeddings()``; the identity when ``hidden`` already
            holds the logits (models whose logits are not ``lm_head(hidden)``).
        hidden: (R, T, H) hidden states, or (R, T, V) logits.
        rows, cols: (N,) positions whose next-token prediction is scored.
        targets: (N,) the token each of those positions predicts.
        out_index: (N,) which of the ``n_out`` responses each position belongs to: each response's positions
            consecutive and in order; responses ``i`` and ``n_out / 2 + i`` are a pair's chosen and rejected.
        tokens: (n_out,) response lengths, passed through.
        token_stats: also sum :class:`TokenStats` per response.
        ld_alpha: LD-DPO (Liu et al. 2024): a response's tokens past the length of the pair's shorter response
            count ``ld_alpha`` times in ``logps`` (the plain sums go to ``unweighted_logps``), as TRL's ``ld_alpha``.
    """
    h = hidden[rows, cols]  # (N, H)
    stats = ChunkStats(token_stats)
    if type(head) is nn.Linear:  # its logits are computed again in the backward pass, not kept (linear_head.py)
        token_logps = [linear_logps(h, head.weight, head.bias, targets, chunk_size, stats)]
    else:  # autograd keeps each chunk's logits
        token_logps = [chunked_logps(lambda x: upcast(head(x)), h, targets, chunk_size, stats)[0]]
    zeros = torch.zeros(n_out, device=hidden.device, dtype=upcast(h).dtype)

    def total(values: list[Tensor]) -> Tensor:  # (N,) per token -> (n_out,) per response
        return zeros.index_add(0, out_index, torch.cat(values)) if values else zeros

    sums = TokenStats(total(stats.entropies), total(stats.top1s), total(stats.wpo_logps)) if token_stats else None
    logit_sums = total(stats.logit_means)
    if ld_alpha is None or not h.shape[0]:
        return ResponseLogps(total(token_logps), tokens, logit_sums, stats=sums)
    weights = ld_weights(out_index, tokens, ld_alpha)  # (N,)
    return ResponseLogps(total([torch.cat(token_logps) * weights]), tokens, logit_sums, stats=sums,
                         unweighted_logps=total(token_logps))


def ld_weights(out_index: Tensor, tokens: Tensor, ld_alpha: float) -> Tensor:
    """(N,) LD-DPO's weight of each scored position: 1 within the first ``min(chosen, rejected)`` tokens of its
    response, ``ld_alpha`` past them. ``out_index`` (N,) as in ``head_logps``; ``tokens`` (2B,) response lengths."""
    _, counts = torch.unique_consecutive(out_index, return_counts=True)
    starts = counts.cumsum(0) - counts
    index_in_response = torch.arange(out_index.shape[0], device=out_index.device) - starts.repeat_interleave(counts)
    n_pairs = tokens.shape[0] // 2
    shared = torch.minimum(tokens[:n_pairs], tokens[n_pairs:]).repeat(2)  # (2B,)
    one = torch.ones((), device=out_index.device)
    return torch.where(index_in_response < shared[out_index], one, torch.full_like(one, ld_alpha))
