"""Checkpoint files that are either the old one or the new one, never half of one.

Lightning's default ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in the
system temp directory; committing it is ``shutil.move``, which becomes a plain copy onto the checkpoint when the
two are on different file systems (``/tmp`` on tmpfs, checkpoints on disk), and a kill during that copy leaves a
truncated ``last.ckpt``. Here the temporary file sits next to the checkpoint, is flushed to disk, and
``os.replace`` (atomic on POSIX within one file system) puts it in place.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..atomic import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-directory temporary files and ``os.replace`` for local paths; remote paths
    (``s3://``...) go through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        fs = get_filesystem(path)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) or storage_options:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_open(path, "wb") as f:
                torch.save(checkpoint, f)
        except (RuntimeError, OSError) as error:  # a full disk shows as torch's "unexpected pos ..." error
            folder = os.path.dirname(os.path.abspath(path))
            free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
            raise OSError(f"writing the checkpoint {path} failed ({error}); the previous one, if any, is kept. "
                          f"It needs about {_gb(tensor_bytes(checkpoint))}, the disk holding it has {_gb(free)} "
                          "free") from error


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint structure."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def trim_checkpoint(state: dict[str, Any], keep_reference: bool, trainable: Optional[set[str]] = None) -> None:
    """Drop from a checkpoint's ``state_dict`` what is rebuilt from its path: the frozen reference (unless
    TR-DPO has moved it, ``keep_reference``) and, with LoRA, the policy's frozen base (``trainable``: the keys of
    the policy's trainable parameters, the only ``policy.`` entries kept)."""
    for key in [k for k in state if k.startswith("reference.") and not keep_reference]:
        del state[key]
    if trainable is not None:
        for key in [k for k in state if k.startswith("policy.") and k not in trainable]:
            del state[key]
