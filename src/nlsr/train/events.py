"""The event log of a run: one JSON record per line in ``log.jsonl`` (start, train, val, end),
the same numbers as TensorBoard scalars when it is installed; cut back to the checkpoint's step
when a run resumes. Only the main process writes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from nlsr.atomic import atomic_write
from nlsr.train.rundir import LOG_FILE


class EventLog:
    """``log.jsonl`` (and ``tb/``) of ``run_dir``; every method is a no-op unless ``enabled``."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path = run_dir / LOG_FILE
        self.tb_dir = run_dir / "tb"
        self.enabled = enabled
        self.tb: Any = None

    def open_tensorboard(self) -> None:
        """Start writing TensorBoard scalars too, when ``torch.utils.tensorboard`` imports."""
        if not self.enabled:
            return
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir))

    def record(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with ``event`` and ``step``) as one line; its numbers, and those of
        its validation ``sets``, as TensorBoard scalars ``event/name``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            scalars = {
                k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"
            }
            for name, scores in record.get("sets", {}).items():
                scalars.update({f"{name}/{metric}": value for metric, value in scores.items()})
            for key, value in scalars.items():
                self.tb.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def prune(self, step: int) -> None:
        """Drop the records after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
        atomic_write(self.path, lambda fh: fh.write("".join(kept).encode("utf-8")))

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self.tb is not None:
            self.tb.close()
