"""One benchmark side per process: each side's peak memory and imports are its own.

A benchmark runs itself again with ``--side NAME`` for each side; the child prints its figures as one ``RESULT``
JSON line (``print_result``) and the parent reads them back (``run_side``).
"""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "RESULT "


def print_result(result: dict) -> None:
    """The child's figures, as the one line ``run_side`` reads."""
    print(PREFIX + json.dumps(result))


def run_side(script: str, arguments: list[str], label: str) -> dict:
    """Run ``script`` with ``arguments`` in a fresh interpreter and return its ``RESULT`` figures; exit with the
    child's output when it fails or prints none."""
    proc = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if proc.returncode or not lines:
        sys.exit(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[0][len(PREFIX):])
