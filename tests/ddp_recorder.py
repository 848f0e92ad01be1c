"""A callback the DDP test loads by class path: each rank writes what it trained on and what it wrote to disk."""

from __future__ import annotations

import json
import os

from lightning.pytorch import Callback

from dpo_lightning.training.export import HFExport


class RecordRank(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.batches = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        n = batch["input_ids"].shape[0] // 2  # chosen rows [:n]: one per pair
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"][:n], batch["attention_mask"][:n])]
        self.batches.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "chosen": rows})

    def teardown(self, trainer, pl_module, stage) -> None:  # after every on_fit_end, the export included
        exports = [cb for cb in trainer.callbacks if isinstance(cb, HFExport)]
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches,
                  "data_written": trainer.datamodule.written,
                  "tables": [getattr(trainer.datamodule, f"{s}_pairs").key for s in ("train", "val")],
                  "export_written": [p for cb in exports for p in cb.written]}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)
