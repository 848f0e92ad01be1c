"""Each round's ``fit``: the fit sections of the ``iterate`` YAML, the round's own config, the ``fit`` process (a
process of its own, so that DDP launches as it does from the shell) and the DPO metrics it logged."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any, Optional, Union

import torch
import yaml

from ..atomic import atomic_open
from ..model.loading import check_attention_trains_on
from .rounds import read_json

# fit scalars kept in the record: TRL's DPO metric names and the probes
FIT_TAGS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/rewards/chosen",
            "train/rewards/rejected", "train/logps/chosen", "train/logps/rejected", "val/loss",
            "val/rewards/accuracies", "val/rewards/margins")
FIT_PREFIXES = ("val/probes/",)


def fit_metrics(log_dir: str) -> dict[str, float]:
    """The round's DPO metrics and probe figures from its TensorBoard log: train metrics averaged over the logged
    steps of the last epoch that logged any (Lightning logs ``epoch`` beside each step; with ``log_every_n_steps``
    above an epoch's steps the last epoch may log none), validation metrics and probes at their last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    epochs = {e.step: e.value for e in acc.Scalars("epoch")} if "epoch" in tags else {}
    out: dict[str, float] = {}
    for tag in sorted(tags):
        if tag.startswith("train/") and tag in FIT_TAGS:
            events = acc.Scalars(tag)
            last = max((epochs.get(e.step, -1) for e in events), default=None)
            values = [e.value for e in events if epochs.get(e.step, -1) == last]
            if values:
                out[tag] = float(sum(values) / len(values))
        elif tag in FIT_TAGS or tag.startswith(FIT_PREFIXES):
            out[tag] = float(acc.Scalars(tag)[-1].value)
    return out


def fit_sections(fit: Union[str, dict], initial_model: Optional[str] = None) -> dict[str, Any]:
    """The ``fit`` sections from a dict or a YAML file, with ``initial_model`` (when given) as the model's path;
    refuses what ``iterate`` sets itself or cannot follow."""
    if isinstance(fit, str):
        with open(fit, encoding="utf-8") as f:
            fit = yaml.safe_load(f) or {}
    config = copy.deepcopy(dict(fit))
    if initial_model:
        config["model"] = {**(config.get("model") or {}), "model_name_or_path": initial_model}
    model = config.get("model") or {}
    if not model.get("model_name_or_path"):
        raise ValueError("fit: model.model_name_or_path is required: the initial policy")
    if (config.get("data") or {}).get("train_path"):
        raise ValueError("fit: data.train_path is set, but iterate trains each round on its own pairs; remove it")
    if ((model.get("lora") or {}).get("lora_export") or "merged") != "merged":
        raise ValueError("fit: model.lora.lora_export must be 'merged': the next round samples from the export")
    accelerator = (config.get("trainer") or {}).get("accelerator") or "auto"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    check_attention_trains_on(model.get("attn_implementation"), "cpu" if on_cpu else "cuda")  # before any sampling
    return config


def write_fit_config(fit_config: dict[str, Any], round_dir: str, policy: str, ref: str,
                     train_file: str = "pairs.jsonl") -> str:
    """The round's ``fit.yaml``: the fit sections with the round's policy, reference, training pairs (``train_file``
    in ``round_dir``), logs, checkpoints and export set; returns its path."""
    config = copy.deepcopy(fit_config)
    model = config.setdefault("model", {})
    model["model_name_or_path"] = policy
    model["reference"] = {**(model.get("reference") or {}), "model_name_or_path": ref}
    config["data"] = {**(config.get("data") or {}), "train_path": os.path.join(round_dir, train_file)}
    trainer = config["trainer"] = dict(config.get("trainer") or {})
    trainer["default_root_dir"] = round_dir
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": round_dir, "name": "", "version": ""}}
    config["checkpoint"] = {**(config.get("checkpoint") or {}), "dirpath": os.path.join(round_dir, "checkpoints")}
    config["export"] = {**(config.get("export") or {}), "dirpath": os.path.join(round_dir, "hf_model"),
                        "enabled": True}
    path = os.path.join(round_dir, "fit.yaml")
    with atomic_open(path, encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
    return path


def fit_command(*args: str) -> list[str]:
    """``python -m dpo_lightning fit ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dpo_lightning", "fit", *args]


def check_fit_config(fit_path: str, shown: Optional[str] = None) -> None:
    """Parse a fit config as the ``fit`` command does; raise with its message (naming it ``shown``, by default its
    path) when it does not parse."""
    proc = subprocess.run(fit_command("--config", fit_path, "--print_config"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"{shown or fit_path} does not parse:\n{proc.stderr.strip()[-2000:]}")


def run_fit(round_dir: str, fit_path: str, r: int) -> dict[str, float]:
    """Train the round with the ``fit`` command (a process of its own: DDP launches as it does from the shell),
    resuming from the round's last checkpoint when one exists; returns its DPO metrics."""
    done = read_json(os.path.join(round_dir, "fit_done.json"))
    if done is not None:
        return done
    last = os.path.join(round_dir, "checkpoints", "last.ckpt")
    resume = ["--ckpt_path", last] if os.path.exists(last) else []
    saved = os.path.join(round_dir, "config.yaml")  # Lightning's copy of fit.yaml; it refuses to overwrite one
    if os.path.exists(saved):
        os.remove(saved)
    print(f"[dpo_lightning] round {r}: fit" + (f", resuming from {last}" if resume else ""), flush=True)
    code = subprocess.call(fit_command("--config", fit_path, *resume))
    if code != 0:
        raise RuntimeError(f"round {r}: fit exited with code {code} ({fit_path}); its output above says why. A fit "
                           "that was killed or crashed resumes from its last checkpoint when the same iterate "
                           "command runs again")
    metrics = fit_metrics(round_dir)
    with atomic_open(os.path.join(round_dir, "fit_done.json"), encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    return metrics
