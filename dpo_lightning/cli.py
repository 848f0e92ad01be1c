"""Command line: ``python -m dpo_lightning COMMAND``: Lightning's ``fit``, ``validate`` and ``test``, and the tools
around them (pair building, on-policy rounds, comparison, export, model conversion). ``--help`` lists them all."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import re
import sys
import warnings
from typing import Callable, Optional

import torch
from jsonargparse import CLI
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .data.datamodule import PreferenceDataModule
from .eval.callback import GenerationProbes
from .eval.compare import compare
from .model.gguf import convert_gguf, fetch_smollm2
from .pairs.build import build_pairs
from .pairs.iterate import iterate
from .training.checkpoint_io import AtomicCheckpointIO
from .training.collapse import CollapseGuard, TrainingCollapsed
from .training.export import HFExport, export_checkpoint
from .training.guard import NonFiniteGuard
from .training.host_memory import keep_freed_memory
from .training.module import DPOModule
from .training.resume import checkpoint_folders, find_last_checkpoint, replaced_settings
from .training.settings import CompileSettings, LoraSettings, LossSettings, ReferenceSettings
from .training.throughput import ThroughputTelemetry

EXTRA_COMMANDS: dict[str, Callable] = {
    "build-pairs": build_pairs, "iterate": iterate, "compare": compare, "export": export_checkpoint,
    "convert-gguf": convert_gguf, "fetch-smollm2": fetch_smollm2}


class DPOLightningCLI(LightningCLI):
    """LightningCLI with the settings that must agree linked, and HF export and checkpointing built in."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(GenerationProbes, "probes")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        parser.add_lightning_class_args(CollapseGuard, "collapse_guard")
        parser.add_lightning_class_args(ThroughputTelemetry, "throughput")

    def instantiate_trainer(self, **kwargs):
        """Checkpoints go through :class:`AtomicCheckpointIO` unless the config names its own ``CheckpointIO``."""
        config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [AtomicCheckpointIO()]
        if config.get("logger") is False:  # nothing to log the learning rate to: Lightning refuses the monitor
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [
                c for c in self.trainer_defaults.get("callbacks", []) if not isinstance(c, LearningRateMonitor)]}
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config, callbacks):
        if config.get("enable_checkpointing") is False:  # the checkpoint section's callback would be refused
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path last`` resumes the newest ``last.ckpt`` of earlier runs (Lightning alone looks only in the
        new run's own, empty, folder); model settings the command gave that the checkpoint replaces are named."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        if section.get("ckpt_path") == "last":
            trainer, checkpoint = section.get("trainer") or {}, section.get("checkpoint") or {}
            folders = checkpoint_folders(trainer.get("default_root_dir"), checkpoint.get("dirpath"),
                                         trainer.get("logger"))
            model, data = section.get("model") or {}, section.get("data") or {}
            expected = {"model.model_name_or_path": model.get("model_name_or_path"),
                        "data.train_path": data.get("train_path")}
            found, skipped = find_last_checkpoint(folders, expected)
            if skipped:
                rank_zero_warn("[dpo_lightning] ckpt_path last: passed over the checkpoints of runs with another "
                               "model or data: " + "; ".join(skipped))
            if found:
                rank_zero_info(f"[dpo_lightning] ckpt_path last: {found}")
            else:
                rank_zero_warn(f"[dpo_lightning] ckpt_path last: no {os.path.join(folders, 'last.ckpt')} (a glob "
                               "pattern) of this model and data; "
                               f"{subcommand} starts from model.model_name_or_path")
            section["ckpt_path"] = found
        given = copy.deepcopy(section.get("model"))
        super()._parse_ckpt_path()
        defaults = self._parser(subcommand).get_defaults().get("model")
        replaced = replaced_settings(given, defaults, self.config[subcommand].get("model"))
        if replaced:
            rank_zero_warn(f"[dpo_lightning] {self.config[subcommand]['ckpt_path']}: the checkpoint's model settings "
                           "are used, not the ones given: " + "; ".join(
                               f"model.{key} {value!r} (given {given_value!r})"
                               for key, given_value, value in replaced))

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)  # DPO has nothing to predict; generation lives in the export
        return commands

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for name, function in EXTRA_COMMANDS.items():  # listed by --help; cli_main runs them
            summary = (function.__doc__ or "").strip().splitlines()[0]
            subcommands.add_subcommand(name, type(parser)(prog=f"{parser.prog} {name}"), help=summary)


MODEL_SECTIONS = {"loss": LossSettings, "reference": ReferenceSettings, "lora": LoraSettings,
                  "compile": CompileSettings}


def section_hints(argv: list[str]) -> list[str]:
    """Where a flat model setting lives: TRL's ``beta`` is ``model.loss.beta`` here. One line per ``--model.X``
    argument, or ``model: {X: ...}`` key of a ``--config`` file, whose X is no setting of the model but is one of
    a section of it (``MODEL_SECTIONS``)."""
    import yaml

    given = [(m.group(1), f"--model.{m.group(1)}") for arg in argv
             if (m := re.fullmatch(r"--model\.(\w+)(=.*)?", arg))]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        try:
            with open(path, encoding="utf-8") as f:
                model = (yaml.safe_load(f) or {}).get("model")
        except (TypeError, OSError, yaml.YAMLError, AttributeError):
            continue  # not a readable mapping: the CLI's own parser names the problem
        given += [(key, f"{path}: model.{key}") for key in (model if isinstance(model, dict) else {})]
    direct = set(inspect.signature(DPOModule.__init__).parameters)
    homes = {"reference_name_or_path": ("reference", "model_name_or_path")}  # TRL's ref_model path
    homes.update({f.name: (section, f.name) for section, settings in MODEL_SECTIONS.items()
                  for f in dataclasses.fields(settings) if f.name not in direct})
    return [f"{where}: the {homes[key][0]} settings are a section of the model: model.{'.'.join(homes[key])}"
            for key, where in given if key in homes and key not in direct]


def cli_main(args: Optional[list[str]] = None) -> Optional[DPOLightningCLI]:
    argv = sys.argv[1:] if args is None else list(args)
    if not torch.cuda.is_available():
        keep_freed_memory()  # training and generation on CPU reuse freed pages (training/host_memory.py)
    if argv and argv[0] in EXTRA_COMMANDS:
        CLI(EXTRA_COMMANDS[argv[0]], args=argv[1:], as_positional=False, prog=f"{sys.argv[0]} {argv[0]}")
        return None
    hints = section_hints(argv)
    if hints:
        raise ValueError("; ".join(hints))
    # the frozen reference stays in eval mode on purpose; Lightning's generic warning about it is noise
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # no validation split (val_fraction 0, the default) is an empty validation loader; Lightning warns about any
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts on Ampere and newer
    try:
        return DPOLightningCLI(
            DPOModule,
            PreferenceDataModule,
            auto_configure_optimizers=False,
            seed_everything_default=42,
            trainer_defaults={"max_epochs": 1, "callbacks": [LearningRateMonitor(logging_interval="step")]},
            args=args,  # None: LightningCLI reads sys.argv itself
        )
    except TrainingCollapsed as error:  # a verdict on the run, not a bug: the message says what to do
        raise SystemExit(str(error)) from None
