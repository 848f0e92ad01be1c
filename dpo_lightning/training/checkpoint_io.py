"""Checkpoint files that are either the old one or the new one, never half of one.

Lightning's default ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in the
system temp directory; committing it is ``shutil.move``, which becomes a plain copy onto the checkpoint when the
two are on different file systems (``/tmp`` on tmpfs, checkpoints on disk), and a kill during that copy leaves a
truncated ``last.ckpt``. Here the temporary file sits next to the checkpoint, is flushed to disk, and
``os.replace`` (atomic on POSIX within one file system) puts it in place.
"""

from __future__ import annotations

import errno
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
        except (RuntimeError, OSError) as error:
            # a full disk shows as ENOSPC, or as torch's "unexpected pos ..." from its zip writer
            full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)
            if not full and not isinstance(error, OSError):
                raise
            message = f"writing the checkpoint {path} failed ({error}); the previous one, if any, is kept"
            if full:
                folder = os.path.dirname(os.path.abspath(path))
                message += (f". It needs about {_size(tensor_bytes(checkpoint))}, the disk holding it has "
                            f"{_size(shutil.disk_usage(folder).free)} free")
            raise OSError(message) from error


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint structure."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.2f} MB"


def trim_checkpoint(state: dict[str, Any], keep_reference: bool, trainable: Optional[set[str]] = None) -> None:
    """Drop from a checkpoint's ``state_dict`` what is rebuilt from its path: the frozen reference (unless
    TR-DPO has moved it, ``keep_reference``) and, with LoRA, the policy's frozen base (``trainable``: the keys of
    the policy's trainable parameters, the only ``policy.`` entries kept)."""
    for key in [k for k in state if k.startswith("reference.") and not keep_reference]:
        del state[key]
    if trainable is not None:
        for key in [k for k in state if k.startswith("policy.") and k not in trainable]:
            del state[key]
