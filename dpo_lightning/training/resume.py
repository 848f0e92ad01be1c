"""What ``--ckpt_path`` means on the command line: ``last`` finds the newest ``last.ckpt`` of earlier runs of the same
model and data, and the model settings a checkpoint restores are compared with the ones the command gave."""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Mapping, Optional


def checkpoint_folders(root_dir: Optional[str], dirpath: Optional[str], logger: Any) -> str:
    """The folders (a glob pattern) whose ``last.ckpt`` files ``--ckpt_path last`` chooses from: the checkpoint
    section's ``dirpath`` when set, else every run's ``checkpoints/`` under the logger's folder
    (``<root>/lightning_logs/version_*`` by default; a TensorBoard or CSV logger's ``save_dir`` and ``name``, the
    first one's of several), or ``<root>/checkpoints`` without a logger (Lightning's places)."""
    if dirpath:
        return glob.escape(dirpath)
    root = root_dir or os.getcwd()
    if logger is False:
        return os.path.join(glob.escape(root), "checkpoints")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    if hasattr(logger, "as_dict"):  # the parsed config holds jsonargparse namespaces
        logger = logger.as_dict()
    save_dir, name = root, "lightning_logs"
    if isinstance(logger, Mapping):  # a logger section: class_path + init_args
        args = logger.get("init_args") or {}
        save_dir = args.get("save_dir") or root
        name = args.get("name", name) or ""
    return os.path.join(glob.escape(save_dir), glob.escape(name), "*", "checkpoints")


def _same_path(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return a == b


def other_run(checkpoint: str, expected: Mapping[str, Any]) -> Optional[str]:
    """Why ``checkpoint`` belongs to a run with other settings: the first ``expected`` key (``"model.
    model_name_or_path"``) whose value in the run's saved ``config.yaml`` (beside its ``checkpoints/``) differs,
    as ``key 'saved'``; None when they agree or the run saved no config."""
    import yaml

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
    try:
        with open(config, encoding="utf-8") as f:
            saved = flatten(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        return None
    for key, value in expected.items():
        if key in saved and not _same_path(saved[key], value):
            return f"{key} {saved[key]!r}"
    return None


def find_last_checkpoint(folders: str, expected: Optional[Mapping[str, Any]] = None
                         ) -> tuple[Optional[str], list[str]]:
    """The most recently written ``last.ckpt`` (or ``last-vN.ckpt``, when a run saved into a folder that already
    held one) in the ``folders`` pattern whose run agrees with ``expected`` (:func:`other_run`), or None; and the
    checkpoints passed over, each with the setting that differs."""
    found = [p for p in glob.glob(os.path.join(folders, "last*.ckpt"))
             if os.path.isfile(p) and re.fullmatch(r"last(-v\d+)?\.ckpt", os.path.basename(p))]
    skipped, kept = [], []
    for path in found:
        reason = other_run(path, expected or {})
        if reason:
            skipped.append(f"{path} ({reason})")
        else:
            kept.append(path)
    return (max(kept, key=os.path.getmtime) if kept else None), skipped


def flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (or jsonargparse namespaces) as ``{"a.b.c": value}``."""
    if hasattr(settings, "as_dict"):
        settings = settings.as_dict()
    if not isinstance(settings, Mapping):
        return {prefix: settings}
    out: dict[str, Any] = {}
    for key, value in settings.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def replaced_settings(given: Any, defaults: Any, restored: Any) -> list[tuple[str, Any, Any]]:
    """The model settings the command set (``given`` differs from ``defaults``) that the checkpoint's
    hyperparameters replaced: ``(key, given value, restored value)`` for each."""
    given, defaults, restored = flatten(given), flatten(defaults), flatten(restored)
    return [(key, value, restored.get(key)) for key, value in sorted(given.items())
            if value != defaults.get(key) and key in restored and restored[key] != value]
