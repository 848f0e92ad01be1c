"""model.compile.torch_compile: compiled decoder layers give the eager loss and gradients."""

import torch

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.losses import dpo_loss
from dpo_lightning.model.compile import decoder_layers

from conftest import dpo_module


def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_model_dir, tiny_reference_dir, pairs_jsonl):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=4,
                              cache_dir=None)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [next(loader), next(loader)]  # two sequence lengths: dynamic shapes, no recompile per length
    results = []
    for compiled in (False, True):
        module = dpo_module(tiny_model_dir, reference_name_or_path=tiny_reference_dir, torch_compile=compiled)
        module.configure_model()
        layers = decoder_layers(module.policy) + decoder_layers(module.reference.model)
        assert len(layers) == 4 and all((m._compiled_call_impl is not None) == compiled for m in layers)
        losses = []
        for batch in batches:
            x, _ = module.pair_logps(batch)
            loss = dpo_loss(x.policy_chosen_logps, x.policy_rejected_logps, x.reference_chosen_logps,
                            x.reference_rejected_logps, beta=0.1).mean()
            loss.backward()
            losses.append(loss.detach())
        results.append((torch.stack(losses), [p.grad.clone() for p in module.policy.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max().item())
