"""Model back ends: the built-in tiny model (toy world) and SD3 through diffusers."""
from ..config import ConfigError
from .base import Backend
from .sd3 import SD3Backend  # imports no diffusers: building one does (flowopd[sd3])
from .tiny import TinyBackend, CheckpointError, load_checkpoint, save_checkpoint, resolve_checkpoint


def make_backend(cfg, checkpoint: str | None = None, device=None):
    """The model a trainer config names, on `device` (default cfg.device).

    cfg.backend "tiny": the flowopd checkpoint `checkpoint` (GRPO's `init`, OPD's `base`; 'base' =
    the shipped base). cfg.backend "sd3": `SD3Backend.from_pretrained(cfg.model)` (a diffusers
    StableDiffusion3Pipeline directory or hub id) with the config's resolution (None: the pipeline's), dtype,
    mixed_precision, max_sequence_length and gradient_checkpointing; diffusers is imported only here.
    """
    device = str(device if device is not None else cfg.device)
    kind = getattr(cfg, "backend", "tiny")
    if kind == "tiny":
        return load_checkpoint(checkpoint or "base", device)
    if kind == "sd3":
        if not cfg.model:
            raise ConfigError("backend sd3 needs model (a StableDiffusion3Pipeline directory or hub id)")
        return SD3Backend.from_pretrained(
            cfg.model, device=device, dtype=cfg.dtype, resolution=getattr(cfg, "resolution", None),
            max_sequence_length=cfg.max_sequence_length, gradient_checkpointing=cfg.gradient_checkpointing,
            mixed_precision=cfg.mixed_precision)
    raise ConfigError(f"unknown backend {kind!r}; use tiny or sd3")


__all__ = ["Backend", "TinyBackend", "CheckpointError", "load_checkpoint", "make_backend", "save_checkpoint",
           "resolve_checkpoint", "SD3Backend"]
