"""Importable from the ``iterate`` and ``fit`` processes the tests start (``tests/`` joins their PYTHONPATH): a batch
reward, a unit-test check for :class:`PythonCheck`, and a callback that kills a run the way a crash does."""

import os
import signal

from lightning.pytorch import Callback


def characters(questions, answers):
    """A batch reward: the answer's length in characters."""
    return [float(len(a)) for a in answers]


def fails_on_sky(questions, answers):
    """A batch reward that raises on answers mentioning the sky."""
    for a in answers:
        if "sky" in a:
            raise KeyError("sky")
    return [0.0 for _ in answers]


def passes_tests(answer, row):
    """1 when the code in ``answer`` passes the asserts in ``row['tests']``, else 0."""
    scope = {}
    try:
        exec(answer, scope)  # noqa: S102 - test helper: the answers are the test's own strings
        exec(row["tests"], scope)  # noqa: S102
    except Exception:  # noqa: BLE001 - any failure is a failed test
        return False
    return True


class KillOnce(Callback):
    """SIGKILLs the ``iterate`` process and this ``fit`` process before optimizer step ``step`` of the round whose
    directory ends with ``round_dir``, when ``marker`` exists (it is removed first, so a rerun runs through)."""

    def __init__(self, marker: str, round_dir: str = "round_2", step: int = 2) -> None:
        self.marker, self.round_dir, self.step = marker, round_dir, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        here = os.path.normpath(trainer.default_root_dir)
        if trainer.global_step == self.step and here.endswith(self.round_dir) and os.path.exists(self.marker):
            os.remove(self.marker)
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
