"""Model back ends: the built-in tiny model (toy world) and SD3 through diffusers."""
from .base import Backend
from .tiny import TinyBackend, CheckpointError, load_checkpoint, save_checkpoint, resolve_checkpoint

__all__ = ["Backend", "TinyBackend", "CheckpointError", "load_checkpoint", "save_checkpoint", "resolve_checkpoint"]
