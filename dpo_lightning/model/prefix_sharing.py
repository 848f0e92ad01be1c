"""Prefix sharing: each pair runs as one sequence ``[prompt, chosen, rejected]``, so the prompt is encoded once.

The rejected tokens attend to the prompt and to each other but not to the chosen tokens, and take the positions
right after the prompt (``position_ids``), so every response token sees exactly what it sees in its own row of the
plain ``(2B, T)`` batch: the log-probs are the same up to float rounding (``tests/test_prefix_sharing.py``).
Saves ``B * prompt`` tokens a forward and the padding between chosen and rejected; costs a ``(B, 1, L, L)`` mask,
which needs the ``sdpa``, ``eager`` or ``flex_attention`` implementation. With ``flex_attention`` the mask goes to
the kernel as a block mask, whose blocks no query attends are skipped: packed pairs then cost the attention of their
own segments, not of the row's square (CUDA; on CPU FlexAttention has no backward pass).

Sliding-window models (Mistral, Gemma 2/3, Qwen2 with ``use_sliding_window``): a custom mask replaces the model's
own, window included, so the window is applied here, in position space. When layers differ (some full, some
sliding), the backbone gets one mask per kind of layer, as ``generate`` hands it; a model that takes no such
mapping runs batches with a row longer than the window in the plain layout. Models with layers that are not
attention (convolutions, state spaces, linear attention) cannot share at all.

The rows are built in ``model/packing.py``, which can also pack several pairs into one row (``packing``): the same
checks and masks apply, and the log-probs are the same.

Worked example, prompt ``[p0, p1]``, chosen ``[c0]``, rejected ``[r0, r1]``::

    input_ids     p0 p1 c0 r0 r1
    position_ids   0  1  2  2  3
    r0 attends to p0 p1 .. r0        (not c0); r0 is scored from p1's hidden state, r1 from r0's
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .logprobs import ResponseLogps, head_logps, hidden_states, plain_head, response_logps
from .packing import SharedLayout, pair_segments, row_layout

MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


class AttentionPattern(NamedTuple):
    window: Optional[int]  # a sliding layer's keys: positions q - window < k <= q; None: no layer slides
    mixed: bool  # some layers full, some sliding: one custom mask cannot serve both


ATTENTION_KINDS = {"full_attention", "sliding_attention"}
# Model types whose shared-layout log-probs equal the plain layout's (tiny random models of each,
# tests/test_prefix_sharing.py). Others may take positions from token indices rather than ``position_ids`` or
# build position biases from a 2-D mask (ALiBi: Bloom, MPT), which a shared row would get wrong; they run plain.
VERIFIED_MODEL_TYPES = frozenset({
    "apertus", "arcee", "aria_text", "biogpt", "bitnet", "codegen", "cohere", "cohere2", "ctrl", "diffllama", "doge",
    "ernie4_5", "ernie4_5_moe", "exaone4", "falcon", "gemma", "gemma2", "gemma3_text", "glm", "glm4", "glm4_moe",
    "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "gptj", "granite", "granitemoe",
    "granitemoeshared", "helium", "hunyuan_v1_dense", "jetmoe", "llama", "minimax_m2", "ministral", "mistral",
    "mixtral", "nemotron", "olmo", "olmo2", "olmoe", "opt", "persimmon", "phi", "phi3", "phimoe", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss", "smollm3", "stablelm", "starcoder2"})


def layer_kinds(config) -> set[str]:
    """The kinds of layer a config names (``layer_types``, or ``layers_block_type`` in some hybrid models)."""
    kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    return {kind for kind in kinds if isinstance(kind, str)}


def sharing_blocker(model: nn.Module) -> Optional[str]:
    """Why one ``[prompt, chosen, rejected]`` row under a custom mask cannot give this model's plain-path
    log-probs, or None when it can."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in MASKED_IMPLEMENTATIONS:
        return (f"the {implementation!r} attention implementation takes no custom attention mask (set "
                f"model.attn_implementation to one of {list(MASKED_IMPLEMENTATIONS)})")
    others = layer_kinds(config) - ATTENTION_KINDS
    if others:  # convolutions, state-space and linear-attention layers mix tokens the mask does not govern
        return f"the model has layers of kind {sorted(others)}, which a custom attention mask does not restrict"
    model_type = getattr(config, "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES or getattr(config, "alibi", False):  # Falcon's ALiBi variant
        return (f"model type {model_type!r}{' with ALiBi' if getattr(config, 'alibi', False) else ''} is not among "
                "those whose shared rows were verified to give the plain layout's log-probs "
                "(prefix_sharing.VERIFIED_MODEL_TYPES)")
    return None


def takes_mask_mapping(model: nn.Module) -> bool:
    """Whether the backbone takes a ``{layer kind: mask}`` mapping as its attention mask, as ``generate`` hands
    the models with ``layer_types`` (Gemma 2/3, Qwen2, ...): their forward then skips building its own masks.
    Tried on four tokens: a mapping of plain causal masks must run and give the hidden states of no mask."""
    parameter = next(model.parameters())
    ids = torch.arange(4, device=parameter.device)[None] % model.get_input_embeddings().weight.shape[0]
    causal = torch.ones(4, 4, dtype=torch.bool, device=parameter.device).tril()[None, None]
    if getattr(model.config, "_attn_implementation", None) == "eager":
        causal = additive(causal, parameter.dtype)
    try:
        with torch.no_grad():
            plain = hidden_states(model, input_ids=ids)
            mapped = hidden_states(model, input_ids=ids, attention_mask={kind: causal for kind in ATTENTION_KINDS})
    except Exception:  # noqa: BLE001 - a backbone that cannot take the mapping fails in its own way
        return False
    return torch.allclose(plain, mapped)


def choose_layout(models: Sequence[nn.Module], prefix_sharing: bool, blocker: Optional[str] = None,
                  explain: bool = False, packing: bool = False,
                  row_tokens: Optional[int] = None) -> Callable[..., ResponseLogps]:
    """The log-prob function every model of ``models`` runs a batch with: :func:`shared_prefix_logps` when
    ``prefix_sharing`` or ``packing`` is asked for and neither a model (:func:`sharing_blocker`) nor ``blocker``
    stands in the way, else :func:`~dpo_lightning.model.logprobs.response_logps`. ``explain`` says why on global
    rank 0. For models whose layers attend differently, whether they take a mask mapping is tried here, once, not
    every step."""
    blocker = next((b for b in map(sharing_blocker, models) if b), None) or blocker
    wanted = "packing" if packing else "prefix sharing"
    if (prefix_sharing or packing) and blocker and explain:
        rank_zero_info(f"[dpo_lightning] {wanted} off: {blocker}")
    if not (prefix_sharing or packing) or blocker:
        return response_logps
    packed = {"packing": True, "row_tokens": row_tokens} if packing else {}
    if not attention_pattern(models[0].config).mixed:
        return functools.partial(shared_prefix_logps, **packed) if packed else shared_prefix_logps
    mask_mapping = all(takes_mask_mapping(model) for model in models)
    if explain and not mask_mapping:
        rank_zero_info("[dpo_lightning] prefix sharing: this model's layers attend differently (full, and sliding "
                       f"over {attention_pattern(models[0].config).window} tokens); batches with a longer row run in "
                       "the plain layout")
    return functools.partial(shared_prefix_logps, mask_mapping=mask_mapping, **packed)


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as eager attention adds it: 0 where attending, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def block_mask(mask: Tensor):
    """FlexAttention's ``BlockMask`` of a boolean ``(R, 1, L, L)`` mask, True where a query attends a key: the kernel
    skips the blocks in which no query attends any key (other pairs' segments, padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, _, length, _ = mask.shape
    return create_block_mask(lambda b, h, q, k: mask[b, 0, q, k], rows, None, length, length, device=mask.device)


def attention_pattern(config) -> AttentionPattern:
    """What the model's own causal masks add to plain causality. Configs with ``layer_types`` (Qwen2, Gemma 2/3,
    ...) name each layer's kind; the others (Mistral, Phi3) slide in every layer when ``sliding_window`` is set."""
    window = getattr(config, "sliding_window", None)
    kinds = layer_kinds(config) & ATTENTION_KINDS
    if not kinds:
        return AttentionPattern(window, False)
    if "sliding_attention" not in kinds or window is None:
        return AttentionPattern(None, False)
    return AttentionPattern(window, len(kinds) > 1)


def shared_layout(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, pad_token_id: int = 0) -> SharedLayout:
    """Rebuild a plain :class:`~dpo_lightning.data.collate.PreferenceBatch` as one row per pair
    (:func:`~dpo_lightning.model.packing.row_layout`).

    Args:
        input_ids: (2B, T) chosen rows then rejected rows, right-padded; each row is prompt then response.
        attention_mask: (2B, T)
        loss_mask: (2B, T) 1 on response tokens.
    """
    return row_layout(input_ids, attention_mask, loss_mask, pad_token_id=pad_token_id)


def shared_prefix_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                        chunk_size: int = 1024, token_stats: bool = False, ld_alpha: Optional[float] = None,
                        mask_mapping: Optional[bool] = None, packing: bool = False,
                        row_tokens: Optional[int] = None) -> ResponseLogps:
    """The same :class:`~dpo_lightning.model.logprobs.ResponseLogps` as ``response_logps`` on the plain batch, from one
    forward over ``B`` shared rows instead of ``2B``, or with ``packing`` over fewer rows holding several pairs each
    (``model/packing.py``). Arguments as ``response_logps``; ``mask_mapping``: whether the model takes a mask per
    kind of layer (:func:`takes_mask_mapping`), tried when None and needed; ``row_tokens``: packed rows' length,
    at least the batch's longest pair (None: that pair's length)."""
    blocker = sharing_blocker(model)
    if blocker:
        raise ValueError(f"model.prefix_sharing: {blocker}; or turn prefix sharing off")
    implementation = model.config._attn_implementation
    pattern = attention_pattern(model.config)
    bites = pattern.window is not None and attention_mask.sum(-1).max().item() > pattern.window
    plain = None  # why this batch runs in the plain layout
    if bites and pattern.mixed and not (takes_mask_mapping(model) if mask_mapping is None else mask_mapping):
        # one mask cannot serve full and sliding layers
        plain = (f"rows longer than the sliding window ({pattern.window}) of a model whose layers attend "
                 "differently")
    elif (segments := pair_segments(input_ids, attention_mask, loss_mask, strict=False)) is None:
        # a response's first token is predicted from the prompt's last one, which this pair lacks or does not share
        plain = ("a batch with a pair whose chosen and rejected rows share no prompt token (an empty prompt, and a "
                 "tokenizer that adds no BOS token) or start with different prompts")
    if plain is not None:
        warnings.warn(f"prefix sharing: {plain}; this batch runs in the plain layout", stacklevel=2)
        return response_logps(model, input_ids, attention_mask, loss_mask, chunk_size, token_stats=token_stats,
                              ld_alpha=ld_alpha)
    layout = row_layout(input_ids, attention_mask, loss_mask, packing, row_tokens, segments=segments)
    mask: Union[Tensor, dict[str, Tensor]] = layout.mask
    if bites:  # the window in position space: rejected tokens continue the prompt's positions
        distance = layout.position_ids[:, None, :, None] - layout.position_ids[:, None, None, :]  # (R, 1, L, L)
        sliding = layout.mask & (distance < pattern.window)
        mask = {"full_attention": layout.mask, "sliding_attention": sliding} if pattern.mixed else sliding
    # eager adds a float mask (0 where attending, the dtype's minimum elsewhere); FlexAttention takes its blocks
    convert = {"eager": functools.partial(additive, dtype=next(model.parameters()).dtype),
               "flex_attention": block_mask}.get(implementation)
    if convert is not None:
        mask = {kind: convert(m) for kind, m in mask.items()} if isinstance(mask, dict) else convert(mask)
    inputs = {"input_ids": layout.input_ids, "attention_mask": mask, "position_ids": layout.position_ids}
    if plain_head(model):
        head, hidden = model.get_output_embeddings(), hidden_states(model, **inputs)
    else:  # the model's own logits (soft-capping, scaling), gathered at the scored positions
        head, hidden = nn.Identity(), model(**inputs, use_cache=False).logits
    return head_logps(head, hidden, layout.rows, layout.cols, layout.targets, layout.out_index, input_ids.shape[0],
                      chunk_size, layout.tokens, token_stats=token_stats, ld_alpha=ld_alpha)
