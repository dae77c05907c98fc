"""The training logger every trainer shares: JSONL always, tensorboard too when installed, and
Weights & Biases when a config asks for it (`wandb: PROJECT`; the optional extra flowopd[wandb],
imported only then; WANDB_MODE=offline works without a network)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


class RunLogger:
    """Appends {"step": n, ...} records to OUT/train_log.jsonl (and OUT/tb when tensorboard is there)."""

    def __init__(self, out: Path, name: str = "train_log.jsonl", tensorboard: bool = True, wandb: str = "",
                 config: dict | None = None):
        self.wb = _wandb_run(wandb, out, config) if wandb else None
        self.f = open(Path(out) / name, "a")
        self.tb = None
        if not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional (tensorboard package), heavy

            self.tb = SummaryWriter(str(Path(out) / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, rec: dict):
        self.f.write(json.dumps({"step": step, **rec}) + "\n")
        self.f.flush()
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self):
        self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _wandb_run(project: str, out: Path, config: dict | None):
    """A wandb run in `project`, named after the --out directory, its files under out/wandb."""
    try:
        import wandb  # optional (flowopd[wandb]), heavy: only for wandb: PROJECT
    except ImportError:
        raise ConfigError("wandb: PROJECT needs the wandb package: pip install 'flowopd[wandb]'") from None
    return wandb.init(project=project, name=Path(out).name, dir=str(out), config=config or {})


class NullLogger:
    """The logger of processes other than rank 0: records nothing."""

    def log(self, step: int, rec: dict):
        pass

    def close(self):
        pass
