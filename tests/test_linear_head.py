"""model/linear_head.py: the head's log-probs and gradients equal autograd through the full log-softmax, though
no logits are kept for the backward pass."""

import pytest
import torch

from dpo_lightning.model.linear_head import ChunkStats, linear_logps
from dpo_lightning.model.logprobs import head_logps

from conftest import DEVICES


def plain(h, weight, bias, targets):
    """Autograd through the whole (N, V) log-softmax: the independent computation."""
    logits = torch.nn.functional.linear(h, weight, bias)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def inputs(n=13, hidden=8, vocab=29, bias=True, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=dtype)  # d loss / d logp, different for every position
    return tuple(None if t is None else t.to(device) for t in (h, weight, b, targets, upstream))


def gradients(fn, h, weight, bias, targets, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (h, weight) + ((bias,) if bias is not None else ())]
    logps = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, targets)
    (logps * upstream).sum().backward()
    return logps.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_logps_and_gradients_equal_the_full_log_softmax_in_fp64(chunk_size, bias, device):
    args = inputs(bias=bias, device=device)
    want, want_grads = gradients(plain, *args)
    got, got_grads = gradients(lambda h, w, b, t: linear_logps(h, w, b, t, chunk_size, ChunkStats(False)), *args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_logits_are_kept_for_the_backward_pass():
    h, weight, bias, targets, _ = inputs(n=64, hidden=8, vocab=4096)
    h.requires_grad_()
    weight.requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        linear_logps(h, weight, bias, targets, 16, ChunkStats(False))
    assert max(kept) <= weight.numel()  # the weight itself, never an (n, V) block of logits beyond it
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        plain(h, weight, bias, targets)
    assert max(kept) >= 64 * 4096  # what autograd keeps without it


def test_head_logps_takes_it_for_a_linear_head_and_gives_the_generic_paths_sums_and_stats():
    """A plain nn.Linear head goes through linear_logps; the same head wrapped in a lambda takes the generic chunk
    loop: sums, token stats and LD-DPO weights agree, and so do the gradients."""
    h, weight, bias, targets, _ = inputs(n=12, hidden=8, vocab=29)
    head = torch.nn.Linear(8, 29, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    hidden = h.reshape(2, 6, 8)
    rows, cols = torch.tensor([0] * 5 + [1] * 4), torch.tensor([0, 1, 2, 3, 4, 1, 2, 3, 4])
    out_index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    tokens = torch.tensor([3, 2, 2, 2])
    results = []
    for fn in (head, lambda x: head(x)):
        head.zero_grad()
        out = head_logps(fn, hidden, rows, cols, targets[:9], out_index, 4, 4, tokens, token_stats=True,
                         ld_alpha=0.5)
        (out.logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)).sum().backward()
        results.append((out, head.weight.grad.clone(), head.bias.grad.clone()))
    (fast, fast_w, fast_b), (generic, generic_w, generic_b) = results
    for name in ("logps", "logit_sums", "unweighted_logps"):
        torch.testing.assert_close(getattr(fast, name), getattr(generic, name), rtol=1e-12, atol=1e-12)
    for a, b in zip(fast.stats, generic.stats):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_w, generic_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_b, generic_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_runs_the_head_in_bf16_as_the_plain_path_does(device):
    h, weight, bias, targets, upstream = inputs(n=20, hidden=16, vocab=64, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        want, want_grads = gradients(lambda *a: plain(*a).float(), h, weight, bias, targets, upstream)
        got, got_grads = gradients(lambda h_, w, b, t: linear_logps(h_, w, b, t, 7, ChunkStats(False)),
                                   h, weight, bias, targets, upstream)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)  # bf16 logits on both sides
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_no_positions_give_empty_logps_and_zero_gradients():
    h, weight, bias, targets, _ = inputs(n=0)
    h.requires_grad_()
    weight.requires_grad_()
    logps = linear_logps(h, weight, bias, targets, 4, ChunkStats(True))
    assert logps.shape == (0,)
    logps.sum().backward()
    assert weight.grad is not None and not weight.grad.any()
