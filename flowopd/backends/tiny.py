"""The tiny backend: TinyUNet + prompt tokenizer behind the Backend interface,
with named LoRA adapters through peft so teachers and students share one base.

A checkpoint is a directory: ``config.json`` (backend, model config, sampling
defaults, provenance) and ``model.safetensors`` (full weights), plus
``adapters/<name>.safetensors`` for named adapters on top of the base.
``base`` names the base model shipped inside the package.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..errors import CheckpointError
from ..lora import Lora, lora_from_state_dict, lora_deltas, lora_to_state_dict, weights_added
from ..world.render import to_uint8
from .tiny_model import TinyConfig, TinyUNet, Tokenizer

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out", "conv1", "conv2", "film"]
BACKENDS = ("tiny", "sd3")  # the values of config.json["backend"] this package writes
# config.json["format"] of tiny checkpoints: bumped when a change to the model or the files would make
# this version misread a checkpoint. Checkpoints from before the key existed are format 1 (same layout).
# Format 2 added the model key `roles` (absent in format 1: no role embedding); format 3 the keys
# `pooled_text` and `xattn_full` (absent before: pooled FiLM on, no 32x32 cross-attention); format 4
# the key `patch` (absent before: 1, the pixel U-Net).
FORMAT = 4


def shipped_base_dir() -> Path:
    return Path(str(resources.files("flowopd").joinpath("checkpoints/base")))


def resolve_checkpoint(name: str | Path) -> Path:
    if str(name) == "base":
        return shipped_base_dir()
    p = Path(name)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (use 'base' for the shipped base model)")
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise CheckpointError(f"{p} is not a flowopd checkpoint (needs config.json and model.safetensors)")
    return p


def check_targets(model, targets) -> None:
    """Refuse LoRA targets inside the prompt encoder (`text.`): like SD3's text encoders it stays
    frozen, and two of its parts would not even see a LoRA: its transformer layers run PyTorch's fused
    inference path under no_grad (which reads the weights directly, so rollouts would ignore the
    adapter that training uses), and peft stores an Embedding's factors under keys that
    flowopd.lora does not read."""
    names = [n for n, _ in model.named_modules()]
    for t in targets:
        inside = [n for n in names if (n == t or n.endswith("." + t)) and n.startswith("text.")]
        if inside:
            raise ConfigError(f"lora_targets: {t!r} matches {inside[0]!r} in the prompt encoder, which the "
                              f"tiny back end keeps frozen; target the image model's layers "
                              f"(default {LORA_TARGETS})")


class TinyBackend:
    name = "tiny"
    # noise "auto" on one CPU process draws from one stream generator (what toy runs always drew)
    stream_noise = True
    pixel_space = True          # model space is the image in [-1, 1]: decoding clamps
    default_lora_init = True    # peft's init_lora_weights for lora_init "" (B = 0)

    def __init__(self, model: TinyUNet, device: str | torch.device = "cpu", sampling: dict | None = None):
        self.device = torch.device(device)
        # channels-last convolutions: ~1.7x faster sampling on the CPU (oneDNN), same numbers up
        # to float rounding
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.tokenizer = Tokenizer()
        self.sampling = dict(sampling or {})
        self.adapters: list[str] = []
        self._peft = None

    # ---- the Backend interface ------------------------------------------------
    def encode_prompts(self, prompts):
        ids, slots = self.tokenizer.batch(list(prompts), device=self.device)
        return self.net.encode(ids, slots)

    def velocity(self, x, sigma, cond):
        if not torch.is_tensor(sigma) or sigma.ndim == 0:
            sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
        return self.net(x, sigma, cond)

    def decode(self, x) -> np.ndarray:
        return to_uint8(x)

    def latent_shape(self):
        return (3, 32, 32)

    def trainable_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    # ---- adapters (peft LoRA) ---------------------------------------------------
    @property
    def net(self):
        return self._peft if self._peft is not None else self.model

    def add_adapter(self, name: str, rank: int = 8, alpha: float | None = None, targets=None, init: bool = True,
                    trainable: bool = True):
        """Add a named LoRA adapter over the frozen base and make it active (`trainable`: for the
        contract's sake; the tiny back end leaves requires_grad to peft and the trainer)."""
        from peft import LoraConfig, get_peft_model  # peft imports transformers (heavy): only when adapters are used

        check_targets(self.model, targets or LORA_TARGETS)
        cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets or LORA_TARGETS,
                         init_lora_weights=init, lora_dropout=0.0)
        if self._peft is None:
            self._peft = get_peft_model(self.model, cfg, adapter_name=name)
        else:
            self._peft.add_adapter(name, cfg)
        self.adapters.append(name)
        self.set_adapter(name)

    def set_adapter(self, name: str):
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {self.adapters}")
        self._peft.set_adapter(name)

    @contextmanager
    def adapter(self, name: str | None):
        """Run a block with adapter `name` active (None: the base, adapters off)."""
        if self._peft is None:
            if name is not None:
                raise KeyError(f"no adapter {name!r}")
            yield
            return
        prev = self._peft.active_adapter
        if name is None:
            with self._peft.disable_adapter():
                yield
        else:
            self.set_adapter(name)
            try:
                yield
            finally:
                self.set_adapter(prev)

    def _lora_layers(self, name: str):
        from peft.tuners.lora import LoraLayer  # heavy (transformers): see add_adapter

        return [m for m in self._peft.modules() if isinstance(m, LoraLayer)
                and (name in m.lora_A or name in getattr(m, "lora_embedding_A", {}))]

    @contextmanager
    def merged(self, name: str | None = None):
        """Run a no-grad block with adapter `name` (None: whatever the model computes now, the active
        adapter or, inside `adapter(None)`, none) folded into the base weights and peft's LoRA branches
        off: the function of `adapter(name)`, to float rounding, without the cost of the branches' small
        extra convolutions (docs/experiments.md, thirty-sixth session). The base weights are copied back
        on exit, bit for bit. With gradients on it is `adapter(name)`: folding would put the frozen base
        weights into the graph."""
        if self._peft is None or torch.is_grad_enabled():
            with nullcontext() if name is None else self.adapter(name):
                yield
            return
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {self.adapters}")
        now = name is None
        name = name or self._peft.active_adapter
        layers = self._lora_layers(name)
        if now and any(m.disable_adapters for m in layers):  # inside adapter(None): the bare base
            yield
            return
        with weights_added([(m.get_base_layer().weight, m.get_delta_weight(name)) for m in layers]), self.adapter(None):
            yield

    @property
    def active_adapter(self) -> str | None:
        """The adapter last selected (peft's active adapter), or None when there are none."""
        return self._peft.active_adapter if self._peft is not None else None

    def attach_lora(self, name: str, lora: Lora, rank: int, alpha: float, targets: list[str],
                    trainable: bool = True) -> str:
        """Add `lora` ({module: (A, B)}) as the named adapter `name` (it becomes the active one).
        `trainable` is for the contract's sake: the tiny back end leaves requires_grad to the trainer."""
        from peft import set_peft_model_state_dict  # heavy (transformers): see add_adapter

        self.add_adapter(name, rank=int(rank), alpha=float(alpha), targets=list(targets))
        res = set_peft_model_state_dict(self._peft, lora_to_state_dict(lora), adapter_name=name)
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
        missing = [k for k in getattr(res, "missing_keys", []) if f".{name}." in k and "lora" in k]
        if bad or missing:
            raise CheckpointError(f"adapter {name!r} does not fit the model: unexpected {bad[:2]}, missing {missing[:2]}")
        return name

    def read_lora(self, name: str) -> tuple[Lora, int, float, list[str]]:
        """Adapter `name` read back: (lora, rank, alpha, targets)."""
        from peft import get_peft_model_state_dict  # heavy (transformers): see add_adapter

        lc = self._peft.peft_config[name]
        lora = lora_from_state_dict(get_peft_model_state_dict(self._peft, adapter_name=name))
        return lora, int(lc.r), float(lc.lora_alpha), sorted(lc.target_modules)

    def merged_state_dict(self) -> dict:
        """Full weights of the base with the active LoRA merged in (the backend is left untouched)."""
        if self._peft is None:
            return self.model.state_dict()
        return copy.deepcopy(self._peft).merge_and_unload().state_dict()

    # ---- save / load -----------------------------------------------------------
    def config_dict(self) -> dict:
        return {"backend": "tiny", "format": FORMAT, "model": self.model.cfg.to_dict(), "sampling": self.sampling}

    def save_checkpoint(self, out: str | Path, adapters: list[str] | None = None, meta: dict | None = None,
                        base: str | Path | None = None) -> Path:
        """A checkpoint of the model as it computes now: full weights with the active LoRA merged in by
        peft, plus each of `adapters` alone (adapters/<name>.safetensors, rank/alpha/targets and `base`
        in config.json["adapters"]). adapters None: every adapter."""
        out = Path(out)
        save_checkpoint(self, out, meta, state_dict=self.merged_state_dict())
        names = list(self.adapters if adapters is None else adapters)
        if not names:
            return out
        from peft import get_peft_model_state_dict  # heavy (transformers): see add_adapter

        (out / "adapters").mkdir(exist_ok=True)
        conf = json.loads((out / "config.json").read_text())
        conf["adapters"] = {}
        for n in names:
            sd = get_peft_model_state_dict(self._peft, adapter_name=n)
            save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()},
                      str(out / "adapters" / f"{n}.safetensors"))
            lc = self._peft.peft_config[n]
            conf["adapters"][n] = _adapter_entry(n, int(lc.r), float(lc.lora_alpha), lc.target_modules, base)
        (out / "config.json").write_text(json.dumps(conf, indent=2))
        return out

    def save_adapter_checkpoint(self, out: str | Path, name: str, base: str | Path, meta: dict) -> Path:
        """Adapter `name` as a LoRA checkpoint over `base` (save_lora_checkpoint: the merged weights
        computed from the factors in float64, not by peft)."""
        lora, rank, alpha, targets = self.read_lora(name)
        return save_lora_checkpoint(out, base, name, lora, rank, alpha, targets, meta)


def save_checkpoint(backend: TinyBackend, out: str | Path, meta: dict | None = None, state_dict=None) -> Path:
    """Write config.json + model.safetensors (the base weights, or state_dict if given)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else backend.model.state_dict()
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp))
    tmp.replace(out / "model.safetensors")
    cfg = backend.config_dict()
    cfg["meta"] = meta or {}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a missing, truncated or damaged file is a CheckpointError."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on truncated files
        raise CheckpointError(f"{path} is unreadable or truncated: {e}") from None


def load_checkpoint(name: str | Path, device: str = "cpu") -> TinyBackend:
    path = resolve_checkpoint(name)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None
    if cfg.get("backend") != "tiny":
        b = cfg.get("backend")
        if b in BACKENDS:
            raise CheckpointError(f"{path}: backend {b!r} is not the tiny backend (load an sd3 checkpoint with "
                                  "flowopd.backends.sd3.load_sd3_checkpoint)")
        raise CheckpointError(f"{path}: unknown backend {b!r}; back ends: {', '.join(BACKENDS)}")
    fmt = cfg.get("format", 1)
    if not isinstance(fmt, int) or not 1 <= fmt <= FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not one this flowopd reads (formats 1-{FORMAT}); "
                              "it was written by another version of flowopd: load it with that version")
    try:
        model = TinyUNet(TinyConfig.from_dict(cfg.get("model", {})))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from None
    sd = read_weights(path / "model.safetensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    if missing:
        raise CheckpointError(f"{path}: weights missing for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise CheckpointError(f"{path}: shape mismatch for {k}: checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)}")
    model.load_state_dict({k: sd[k] for k in own})
    model.eval()
    return TinyBackend(model, device, cfg.get("sampling"))


def _adapter_entry(name: str, rank: int, alpha: float, targets, base) -> dict:
    return {"file": f"adapters/{name}.safetensors", "rank": int(rank), "alpha": float(alpha),
            "targets": sorted(targets), "base": str(base),
            "note": "a LoRA over `base`; model.safetensors already holds it merged"}


def base_state(base: str | Path = "base") -> dict[str, torch.Tensor]:
    """Plain (un-wrapped) float32 state dict of a checkpoint's full weights."""
    return {k: v.float() for k, v in read_weights(resolve_checkpoint(base) / "model.safetensors").items()}


def save_dense_checkpoint(out: str | Path, base: str | Path, deltas: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write base + deltas as a full-weight checkpoint (config.json + model.safetensors)."""
    backend = load_checkpoint(base)
    sd = base_state(base)
    for k, d in deltas.items():
        sd[k] = sd[k] + d.to(sd[k].dtype)
    return save_checkpoint(backend, out, meta, state_dict=sd)


def save_lora_checkpoint(out: str | Path, base: str | Path, name: str, lora: Lora, rank: int, alpha: float,
                         targets: list[str], meta: dict) -> Path:
    """A LoRA over `base` as a checkpoint: merged full weights (model.safetensors), the adapter
    alone (adapters/<name>.safetensors) and its rank/alpha/targets/base in config.json["adapters"]."""
    out = Path(out)
    save_dense_checkpoint(out, base, lora_deltas(lora, alpha / rank), meta)
    (out / "adapters").mkdir(exist_ok=True)
    save_file(lora_to_state_dict(lora), str(out / "adapters" / f"{name}.safetensors"))
    conf = json.loads((out / "config.json").read_text())
    conf["adapters"] = {name: _adapter_entry(name, rank, alpha, targets, base)}
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
