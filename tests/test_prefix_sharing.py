"""model.prefix_sharing: one [prompt, chosen, rejected] row per pair gives the plain path's log-probs and gradients."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.model.logprobs import response_logps
from dpo_lightning.model.prefix_sharing import VERIFIED_MODEL_TYPES, shared_layout, shared_prefix_logps

from conftest import DEVICES, LONG_AND_SHORT, dpo_module, fit_tiny, tiny_architecture, tiny_of_type


def test_worked_example_layout():
    batch = PreferenceCollator(pad_token_id=0)([
        {"prompt_ids": [11, 12], "chosen_ids": [21], "rejected_ids": [31, 32]},
        {"prompt_ids": [13], "chosen_ids": [22, 23], "rejected_ids": [33]}])
    layout = shared_layout(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert layout.input_ids.tolist() == [[11, 12, 21, 31, 32], [13, 22, 23, 33, 0]]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 2, 3] and layout.position_ids[1, :4].tolist() == [0, 1, 2, 1]
    assert layout.mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                               [1, 1, 0, 0, 0],
                                               [1, 1, 1, 0, 0],
                                               [1, 1, 0, 1, 0],  # r0: the prompt and itself, not c0
                                               [1, 1, 0, 1, 1]]
    # (row, column whose hidden state predicts, token, response): chosen of pair i is i, its rejected 2 + i
    scored = list(zip(layout.rows.tolist(), layout.cols.tolist(), layout.targets.tolist(), layout.out_index.tolist()))
    assert scored == [(0, 1, 21, 0), (0, 1, 31, 2), (0, 3, 32, 2), (1, 0, 22, 1), (1, 1, 23, 1), (1, 0, 33, 3)]
    assert layout.tokens.tolist() == [1, 2, 2, 1]


def real_batch(tiny_model_dir, pairs_jsonl):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=5,
                              cache_dir=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    prompts = (batch["attention_mask"] - batch["loss_mask"]).sum(-1)
    assert len(set(prompts.tolist())) > 1  # prompts of different lengths, so rows pad differently
    return batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("plain_head", [True, False])
def test_shared_logps_and_gradients_equal_the_plain_path(tiny_model_dir, pairs_jsonl, implementation, plain_head,
                                                         device):
    batch = real_batch(tiny_model_dir, pairs_jsonl)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).double()
    model.to(device)
    if not plain_head:  # as a soft-capping model: both paths go through the full logits
        model.config.final_logit_softcapping = 30.0
    inputs = tuple(batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    results = []
    for fn in (response_logps, shared_prefix_logps):
        model.zero_grad()
        out = fn(model, *inputs, chunk_size=7, token_stats=True, ld_alpha=0.3)
        (out.logps * torch.linspace(1, 2, out.logps.shape[0], dtype=out.logps.dtype, device=device)).sum().backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert torch.allclose(shared.logps, plain.logps, atol=1e-6)  # fp32 inside (rotary, eager softmax)
    assert torch.allclose(shared.unweighted_logps, plain.unweighted_logps, atol=1e-6)  # LD-DPO's plain sums
    assert torch.allclose(shared.logit_sums, plain.logit_sums, atol=1e-6)
    for a, b in zip(shared.stats, plain.stats):  # entropy, top-1 counts, WPO's aligned log-probs
        assert torch.allclose(a, b, atol=1e-6)
    assert shared.tokens.tolist() == plain.tokens.tolist()
    for a, b in zip(plain_grads, shared_grads):  # the models keep rotary and eager softmax in fp32, even in fp64
        assert torch.allclose(a, b, atol=1e-6 * a.abs().max().item())


def test_module_loss_equals_the_plain_path(tiny_model_dir, tiny_reference_dir, pairs_jsonl):
    batch = real_batch(tiny_model_dir, pairs_jsonl)
    values = []
    for sharing in (False, True):
        module = dpo_module(tiny_model_dir, reference_name_or_path=tiny_reference_dir, prefix_sharing=sharing)
        module.configure_model()
        x, _ = module.pair_logps(batch)
        values.append(torch.stack(list(x[:6])))
    assert torch.allclose(values[0], values[1], atol=1e-5)


def test_unsupported_attention_and_unshared_prompts_are_refused(tiny_model_dir, pairs_jsonl):
    batch = real_batch(tiny_model_dir, pairs_jsonl)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = "flash_attention_2"  # set_attn_implementation would need flash-attn installed
    with pytest.raises(ValueError, match="attn_implementation"):
        shared_prefix_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    other = PreferenceCollator(0)([{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8]}])
    other["input_ids"][1, 0] = 9  # the rejected row's prompt differs
    with pytest.raises(ValueError, match="different prompts"):
        shared_layout(other["input_ids"], other["attention_mask"], other["loss_mask"])


def test_a_batch_with_a_pair_without_prompt_tokens_runs_in_the_plain_layout(tiny_model_dir):
    # an empty prompt with a tokenizer that adds no BOS token: the responses' first tokens are predicted by nothing
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    batch = PreferenceCollator(0)([{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
                                   {"prompt_ids": [], "chosen_ids": [10, 11, 12], "rejected_ids": [13, 14]}])
    args = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    plain = response_logps(model, *args)
    with pytest.warns(UserWarning, match="share no prompt token .* runs in the plain layout"):
        shared = shared_prefix_logps(model, *args)
    assert torch.equal(shared.logps, plain.logps) and torch.equal(shared.tokens, plain.tokens)
    assert plain.tokens.tolist() == [2, 2, 1, 1]  # the first tokens of the empty prompt's responses score nothing
    with pytest.raises(ValueError, match="no prompt token"):
        shared_layout(*args)


def test_cli_fit_with_prefix_sharing_logs_the_plain_runs_metrics(tiny_model_dir, pairs_jsonl, tmp_path):
    metrics = []
    for sharing in ("false", "true"):
        cli, _ = fit_tiny(tmp_path / sharing, tiny_model_dir, pairs_jsonl, f"--model.prefix_sharing={sharing}",
                          "--export.enabled=false", "--trainer.max_epochs=1")
        metrics.append({k: v.item() for k, v in cli.trainer.callback_metrics.items()
                        if k.startswith(("val/", "train/"))})
    assert metrics[0].keys() == metrics[1].keys() and "val/rewards/margins" in metrics[0]
    assert metrics[1] == pytest.approx(metrics[0], abs=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2", "qwen2_mixed", "mistral", "gemma3", "gemma3_mixed"])
def test_other_architectures_and_sliding_windows_equal_the_plain_path(name, implementation):
    # rows of 13 and 11 tokens against a window of 4: the window bites, in the shared rows as in the plain ones.
    # The plain path runs sdpa: eager on right-padded rows gives NaN in fp64 here (a padding query whose whole
    # window is padding), a transformers matter that fp32 and bf16 do not show.
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    model = tiny_architecture(name, window=4)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    results = []
    for fn in (response_logps, shared_prefix_logps):
        model.set_attn_implementation("sdpa" if fn is response_logps else implementation)
        model.zero_grad()
        out = fn(model, *inputs, chunk_size=5)
        (out.logps * torch.linspace(1, 2, 4, dtype=torch.float64)).sum().backward()
        results.append((out.logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert torch.isfinite(plain).all()
    assert torch.allclose(shared, plain, atol=1e-6), (shared, plain)
    for a, b in zip(plain_grads, shared_grads):
        assert torch.allclose(a, b, atol=1e-6 * a.abs().max().item())


def test_window_patterns_and_the_plain_fallback_for_models_without_a_mask_per_layer_kind(monkeypatch):
    import transformers as T

    import dpo_lightning.model.prefix_sharing as sharing
    from dpo_lightning.model.prefix_sharing import AttentionPattern, attention_pattern, takes_mask_mapping
    assert attention_pattern(T.LlamaConfig()) == AttentionPattern(None, False)
    assert attention_pattern(T.Qwen2Config()) == AttentionPattern(None, False)  # Qwen2.5: use_sliding_window false
    assert attention_pattern(T.MistralConfig(sliding_window=4096)) == AttentionPattern(4096, False)
    assert attention_pattern(T.Gemma3TextConfig(sliding_window=512)) == AttentionPattern(512, True)
    assert takes_mask_mapping(tiny_architecture("qwen2_mixed", 4)) and takes_mask_mapping(
        tiny_architecture("gemma3_mixed", 4))

    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    monkeypatch.setattr(sharing, "takes_mask_mapping", lambda model: False)  # as a model without the mapping
    for window, falls_back in ((13, False), (12, True)):  # the longest plain row has 13 tokens
        model = tiny_architecture("qwen2_mixed", window=window)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shared = shared_prefix_logps(model, *inputs)
        assert any("plain layout" in str(w.message) for w in caught) == falls_back
        assert torch.allclose(shared.logps, response_logps(model, *inputs).logps, atol=1e-6)


def test_models_with_layers_that_are_not_attention_are_refused():
    # LFM2's short convolutions mix neighbouring tokens whatever the mask says: a rejected token would read the
    # chosen tokens before it (forced through here, its log-probs differ from the plain path by 4e-5 in fp64)
    import transformers as T

    from dpo_lightning.model.prefix_sharing import sharing_blocker

    config = T.Lfm2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"])
    model = T.Lfm2ForCausalLM(config)
    assert "['conv']" in sharing_blocker(model)
    assert sharing_blocker(tiny_architecture("qwen2_mixed", window=4)) is None
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    with pytest.raises(ValueError, match=r"layers of kind \['conv'\]"):
        shared_prefix_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


def test_models_whose_logits_are_not_the_head_of_the_hidden_states_take_their_own_logits():
    # Falcon-H1 multiplies the head's output by config.lm_head_multiplier; a model from a repository's own code may
    # transform its logits with no config entry (here: halved in forward). Both must score with their own logits.
    import transformers as T

    from dpo_lightning.losses import sequence_logps
    from dpo_lightning.model.logprobs import plain_head

    class HalvedLogits(T.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 2
            return out

    falcon = T.FalconH1Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_n_heads=4,
                              mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=8, mamba_chunk_size=4,
                              lm_head_multiplier=0.25)
    llama = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2)
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch.manual_seed(0)
    for model, plain in ((T.FalconH1ForCausalLM(falcon), False), (HalvedLogits(llama), False),
                         (T.LlamaForCausalLM(llama), True)):
        model = model.double().eval()
        with torch.no_grad():
            expected = sequence_logps(model(input_ids=inputs[0], attention_mask=inputs[1]).logits, inputs[0], inputs[2])
            assert plain_head(model) == plain
            assert torch.allclose(response_logps(model, *inputs).logps, expected, atol=1e-8)


@pytest.mark.parametrize("model_type", sorted(VERIFIED_MODEL_TYPES))
def test_every_verified_model_type_gives_the_plain_layouts_logps(model_type):
    from dpo_lightning.losses import sequence_logps
    from dpo_lightning.model.prefix_sharing import sharing_blocker

    model = tiny_of_type(model_type)
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        full = sequence_logps(model(input_ids=inputs[0], attention_mask=inputs[1]).logits, inputs[0], inputs[2])
        assert sharing_blocker(model) is None
        assert torch.allclose(response_logps(model, *inputs).logps, full, atol=1e-4)
        assert torch.allclose(shared_prefix_logps(model, *inputs).logps, full, atol=1e-4)


def test_alibi_models_are_not_shared():
    # MPT and Bloom bias attention by token index (ALiBi from a 2-D mask): in a shared row MPT's rejected tokens get
    # other biases (log-probs off by 1.4e-2 when forced) and Bloom's cannot take a 4-D mask at all
    import transformers as T

    import dpo_lightning.model.prefix_sharing as sharing

    for model_type in ("mpt", "bloom"):
        assert "not among those whose shared rows were verified" in sharing.sharing_blocker(tiny_of_type(model_type))
    assert "with ALiBi" in sharing.sharing_blocker(T.FalconForCausalLM(T.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True)))


def test_the_layout_is_chosen_once_with_the_mask_mapping_decided(monkeypatch):
    # a mixed full/sliding model: choose_layout tries the mapping once; the steps then never try it again
    from functools import partial

    import dpo_lightning.model.prefix_sharing as sharing

    model = tiny_architecture("qwen2_mixed", window=4)
    layout = sharing.choose_layout([model], prefix_sharing=True)
    assert isinstance(layout, partial) and layout.func is sharing.shared_prefix_logps
    assert layout.keywords == {"mask_mapping": True}
    assert sharing.choose_layout([model], prefix_sharing=False) is response_logps
    assert sharing.choose_layout([tiny_architecture("qwen2", window=4)], True) is sharing.shared_prefix_logps
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    tried = []
    real = sharing.takes_mask_mapping
    monkeypatch.setattr(sharing, "takes_mask_mapping", lambda m: tried.append(m) or real(m))
    with torch.no_grad():
        shared = layout(model, *inputs)
    assert tried == []  # rows longer than the window, yet no trial forward in the step
    assert torch.allclose(shared.logps, response_logps(model, *inputs).logps, atol=1e-6)
