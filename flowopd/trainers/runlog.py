"""The training logger every trainer shares: JSONL always, tensorboard too when installed."""
from __future__ import annotations

import json
from pathlib import Path


class RunLogger:
    """Appends {"step": n, ...} records to OUT/train_log.jsonl (and OUT/tb when tensorboard is there)."""

    def __init__(self, out: Path, name: str = "train_log.jsonl", tensorboard: bool = True):
        self.f = open(Path(out) / name, "a")
        self.tb = None
        if not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, rec: dict):
        self.f.write(json.dumps({"step": step, **rec}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """The logger of processes other than rank 0: records nothing."""

    def log(self, step: int, rec: dict):
        pass

    def close(self):
        pass
