"""What ``--ckpt_path`` means on the command line: ``last`` finds the newest ``last.ckpt`` of earlier runs, and the
model settings a checkpoint restores are compared with the ones the command gave."""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping, Optional


def checkpoint_folders(root_dir: Optional[str], dirpath: Optional[str], logger: Any) -> str:
    """The folders (a glob pattern) whose ``last*.ckpt`` files ``--ckpt_path last`` chooses from: the checkpoint
    section's ``dirpath`` when set, else every run's ``checkpoints/`` under the logger's folder
    (``<root>/lightning_logs/version_*`` by default; a TensorBoard or CSV logger's ``save_dir`` and ``name``)."""
    if dirpath:
        return glob.escape(dirpath)
    root = root_dir or os.getcwd()
    save_dir, name = root, "lightning_logs"
    if isinstance(logger, Mapping):  # a logger section: class_path + init_args
        args = logger.get("init_args") or {}
        save_dir = args.get("save_dir") or root
        name = args.get("name", name) or ""
    return os.path.join(glob.escape(save_dir), glob.escape(name), "*", "checkpoints")


def find_last_checkpoint(folders: str) -> Optional[str]:
    """The most recently written ``last*.ckpt`` in the ``folders`` pattern (``last.ckpt``, or ``last-v1.ckpt`` when
    a run saved into a folder that already held one), or None."""
    found = [p for p in glob.glob(os.path.join(folders, "last*.ckpt")) if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


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
