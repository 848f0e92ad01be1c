"""One way to write a file so that readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import IO, Iterator, Optional


@contextmanager
def atomic_open(path: str, mode: str = "w", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; when the block ends without error it is flushed to disk
    and ``os.replace``-d onto ``path`` (atomic on POSIX within one file system); on error it is removed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
