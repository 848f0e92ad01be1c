"""FSDP. Lightning runs its FSDPStrategy on CUDA only, so on CPU we test (1) the shipped FSDP config and (2) the
pieces the strategy uses, under torch's FSDP itself on 2 CPU processes (gloo): the decoder-layer wrap policy
shards policy AND reference, Lightning's forward redirection gives the plain loss, one optimizer step gives the
plain weights, and the export's gather returns the full policy on rank 0. Not run here: the strategy end to end
(it needs CUDA)."""

import json
import os
import socket
import types

import pytest
import torch
import torch.multiprocessing as mp

from dpo_lightning.cli import DPOLightningCLI
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.eval.callback import GenerationProbes
from dpo_lightning.losses import LOSSES, LossParams
from dpo_lightning.model.fsdp import DecoderLayerPolicy, full_policy_state_dict, is_fsdp
from dpo_lightning.training.module import DPOModule

from conftest import ROOT, dpo_module

TOL = 1e-5


class ParseOnly(DPOLightningCLI):
    """Parses and instantiates everything but the Trainer (which refuses FSDP without CUDA)."""

    def instantiate_trainer(self, **kwargs):
        return self.config_init["trainer"]


def test_shipped_fsdp_config(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cli = ParseOnly(DPOModule, PreferenceDataModule, run=False, auto_configure_optimizers=False,
                    args=["--config", os.path.join(ROOT, "configs", "qwen_identity.yaml"),
                          "--config", os.path.join(ROOT, "configs", "qwen_identity_fsdp.yaml")])
    strategy = cli.trainer["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerPolicy)
    assert strategy.kwargs["use_orig_params"] is True  # policy and reference weights share the root unit
    assert strategy._state_dict_type == "full"  # Lightning keeps it in no public attribute
    assert cli.config_init["probes"].prompts_path is None
    with pytest.raises(ValueError, match="FSDP shards"):  # probes left on would hang rank 0: refused up front
        GenerationProbes(prompts_path="x", name="y").setup(types.SimpleNamespace(strategy=strategy), None, "fit")
    assert is_fsdp(types.SimpleNamespace(strategy=strategy))


def _worker(rank, port, model_dir, reference_dir, data_path, out_dir):
    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dm = PreferenceDataModule(train_path=data_path, tokenizer_name_or_path=model_dir, batch_size=4, cache_dir=None)
    dm.setup("fit")
    batch = dm.collator(dm.train_pairs[rank * 4:(rank + 1) * 4])  # each rank its own 4 pairs
    params = LossParams(beta=0.1)

    def build():
        module = dpo_module(model_dir, reference_name_or_path=reference_dir)
        module.configure_model()
        return module

    # the plain path: one process, the whole 8-pair batch, loss and one SGD step
    plain = build()
    full = dm.collator(dm.train_pairs[:8])
    plain_loss = LOSSES["sigmoid"](plain.pair_logps(full)[0], params).mean()
    plain_loss.backward()
    with torch.no_grad():
        for p in plain.policy.parameters():
            p -= 0.5 * p.grad

    # the sharded path, as Lightning's FSDPStrategy runs training_step: through the root unit's forward
    module = build()
    sharded = FSDP(module, auto_wrap_policy=DecoderLayerPolicy(), use_orig_params=True,
                   device_id=torch.device("cpu"))
    units = [type(m.module).__name__ for m in sharded.modules() if isinstance(m, FSDP)]
    logps, _ = _ForwardRedirection()(sharded, module, "pair_logps", batch)
    loss = LOSSES["sigmoid"](logps, params).mean()
    loss.backward()  # FSDP averages the gradients over ranks: the mean over all 8 pairs
    with torch.no_grad():
        for p in sharded.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=sharded), is_global_zero=rank == 0)
    state = full_policy_state_dict(trainer)
    if rank == 0:
        expected = plain.policy.state_dict()
        diff = max((state[k] - expected[k]).abs().max().item() for k in expected)
        result = {"units": units, "plain_loss": plain_loss.item(), "sharded_loss": sum(x.item() for x in losses) / 2,
                  "keys_equal": sorted(state) == sorted(expected), "max_weight_diff": diff,
                  "moved": max((expected[k] - build().policy.state_dict()[k]).abs().max().item() for k in expected)}
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_policy_and_reference_train_like_the_plain_model(tiny_model_dir, tiny_reference_dir, pairs_jsonl,
                                                                 tmp_path):
    mp.start_processes(_worker, args=(_free_port(), tiny_model_dir, tiny_reference_dir, pairs_jsonl, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["units"].count("LlamaDecoderLayer") == 4  # 2 policy + 2 reference layers, each its own unit
    assert result["units"][0] == "DPOModule"  # the root: both models' embeddings, norms and heads
    assert result["sharded_loss"] == pytest.approx(result["plain_loss"], abs=TOL)
    assert result["keys_equal"] and result["max_weight_diff"] < TOL
    assert result["moved"] > 1e-3  # the step really changed the weights it compares
