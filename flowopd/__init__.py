"""flowopd: multi-task alignment of flow-matching text-to-image models by on-policy distillation (Flow-OPD)."""
__version__ = "0.1.0"
