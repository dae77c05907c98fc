"""Stable Diffusion 3 / 3.5 behind the Backend interface, through diffusers + peft.

The only module of flowopd that imports diffusers (lazily: importing this file costs nothing;
building a backend without the `sd3` extra raises a UserError that names it).

What it does, and where each convention comes from:
  - components: StableDiffusion3Pipeline's transformer (MMDiT), VAE, two CLIP text encoders and T5
    (optional: `drop_t5=True` encodes T5 as zeros, as diffusers does without text_encoder_3);
  - prompts are encoded with diffusers' own `StableDiffusion3Pipeline.encode_prompt` (CLIP-L and
    CLIP-G penultimate states concatenated and zero-padded to T5's width, T5 states appended along
    the sequence; pooled = both CLIP projections) and cached per prompt string (LRU); the empty
    prompt "" is the unconditional prompt (`None` in `encode_prompts`), as in the pipeline's CFG;
  - velocity: the transformer's output at timestep = sigma * 1000 (diffusers' FlowMatchEuler
    timesteps), returned in float32 whatever the weights' dtype, so that callers keep the SDE step,
    log-probs and KLs in float32;
  - decode: latents / scaling_factor + shift_factor -> VAE -> [0, 1] -> uint8 (B, H, W, 3), as the
    pipeline's "np"/"pil" output;
  - LoRA through peft on Flow-GRPO's target modules (the joint-attention projections of the image
    and the text stream; rank 32, alpha 64, gaussian init), as named adapters on one frozen
    transformer: teachers, student and anchor share the base weights, k teachers cost k adapters;
  - `save_lora(name, dir)` writes diffusers' LoRA format (pytorch_lora_weights.safetensors with the
    LoraConfig as metadata): `StableDiffusion3Pipeline.load_lora_weights(dir)` loads it.
    `load_lora(name, path)` reads that format and peft's (adapter_config.json +
    adapter_model.safetensors, the format of Flow-GRPO's released checkpoints).

Adapter semantics (the same as TinyBackend's): `add_adapter(name)` adds and activates an adapter;
`set_adapter(name)` activates one; `with backend.adapter(name):` runs a block with that adapter
(None: all adapters off, i.e. the frozen base) and restores the previous state. Only the active
adapter receives gradients, and only if it is trainable (adapters loaded with `load_lora` are
frozen teachers by default). With gradient checkpointing, call `backward()` with the same adapter
active as in the forward pass: the recomputation uses the adapter active at backward time.
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import ConfigError
from ..errors import UserError
from ..lora import Lora, lora_from_state_dict

# Flow-GRPO (scripts/train_sd3.py): LoRA on the joint attention of every MMDiT block, both streams.
# The image stream's to_q/to_k/to_v/to_out.0 and the text stream's add_{q,k,v}_proj/to_add_out; the
# second attention of SD3.5's dual-attention blocks (attn2) is not targeted.
LORA_TARGETS = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]
LORA_RANK = 32        # Flow-GRPO and Flow-OPD (appendix): r = 32
LORA_ALPHA = 64.0     # alpha = 64
DEFAULT_SAMPLING = {"steps": 40, "cfg": 4.5, "shift": 3.0}  # evaluation: 40 steps, CFG 4.5, SD3 shift 3
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"       # diffusers' default LoRA file name

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


class SD3Error(UserError, ValueError):
    """A missing extra, an unreadable model or adapter, or a bad option of the SD3 back end."""


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return _DTYPES[str(d).lower()]
    except KeyError:
        raise SD3Error(f"unknown dtype {d!r}; use one of fp32, bf16, fp16") from None


def _to(module, device, dtype):
    """module.to(device, dtype), skipping the cast (and diffusers' warning about it) when not needed."""
    p = next(module.parameters(), None)
    if p is not None and p.dtype != dtype:
        module.to(dtype=dtype)
    return module.to(device)


def _local_or_hub(path: str | Path) -> Path:
    """A local file or directory, or a hub id (org/name) fetched with huggingface_hub (its cache)."""
    p = Path(path).expanduser()
    s = str(path)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        return p
    try:
        from huggingface_hub import snapshot_download  # optional (comes with flowopd[sd3]): only for hub ids

        return Path(snapshot_download(s))
    except Exception as e:  # offline, unknown repo, no access: all mean "not found" here
        raise SD3Error(f"no LoRA at {s}: not a local path, and the hub id could not be fetched ({e})") from None


def _diffusers():
    try:
        import diffusers  # optional (flowopd[sd3]) and heavy: only when an SD3 back end is built
        import transformers  # noqa: F401  (the text encoders; optional and heavy, as diffusers)
    except ImportError as e:
        raise SD3Error(f"the SD3 back end needs diffusers and transformers ({e.name} is missing): "
                       "pip install 'flowopd[sd3]'") from None
    return diffusers


def _peft_tuner_layer():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer  # peft imports transformers (heavy)
    except ImportError:
        raise SD3Error("LoRA adapters need peft: pip install 'flowopd[sd3]'") from None
    return BaseTunerLayer


class SD3Backend:
    """SD3/SD3.5 transformer + VAE + text encoders, with named LoRA adapters. See the module doc.

    Build with `SD3Backend.from_pretrained(path_or_hub_id, ...)`, or from already-built components
    with `SD3Backend(transformer, vae, text_encoders, tokenizers, ...)` (the tests use tiny random ones,
    tests/sd3_tiny.py).
    """

    name = "sd3"
    stream_noise = False  # noise "auto": per-group generators (GPU rollouts, several processes)
    pixel_space = False   # latents: decoding goes through the VAE, nothing to clamp
    default_lora_init = "gaussian"  # peft's init_lora_weights for lora_init "" (Flow-GRPO's)

    def __init__(self, transformer, vae, text_encoders=(None, None, None), tokenizers=(None, None, None), *,
                 device: str | torch.device = "cpu", dtype="fp32", vae_dtype="fp32", resolution: int | None = None,
                 max_sequence_length: int = 128, sampling: dict | None = None, lora_dtype="fp32",
                 gradient_checkpointing: bool = False, prompt_cache_size: int = 256,
                 encode_batch_size: int = 32, decode_batch_size: int = 8, model_id: str = "", scheduler=None,
                 mixed_precision: str | None = None):
        """
        transformer: SD3Transformer2DModel; vae: AutoencoderKL (SD3's, with shift_factor);
        text_encoders: (CLIP-L, CLIP-G, T5 or None) with projection; tokenizers: the matching three.
        dtype: weights of the transformer and text encoders (fp32, bf16, fp16); vae_dtype: the VAE's
        (float32 by default, as Flow-GRPO); lora_dtype: the adapters' weights (float32: trained in
        full precision over half-precision base weights). resolution: image side in pixels (None: the
        pipeline's default, transformer sample_size x VAE factor: 1024 for SD3.5-M).
        max_sequence_length: T5 tokens (Flow-GRPO uses 128; diffusers' pipeline default is 256).
        scheduler: kept for `self.pipe.__call__` only (our samplers use flowopd.flow's grids).
        mixed_precision: None/"none" (default: compute in the weights' dtype), or "fp16"/"bf16": the
        transformer runs under torch.autocast to that dtype (Flow-GRPO: fp32 weights, fp16 autocast).
        prompt_cache_size: prompts whose embeddings stay cached on `device` (SD3.5-M, T5 length 128,
        bf16: about 1.7 MB each, so 256 prompts ~ 430 MB).

        `forward_module`: set it to the DDP/FSDP-wrapped transformer (accelerate's `prepare`) to run
        `velocity` through the wrapper; adapters are still switched on `self.transformer`.
        """
        diffusers = _diffusers()
        self.device = torch.device(device)
        self.dtype = _dtype(dtype)
        self.lora_dtype = _dtype(lora_dtype)
        self.max_sequence_length = int(max_sequence_length)
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.model_id = str(model_id)
        self.prompt_cache_size = int(prompt_cache_size)
        self.encode_batch_size = int(encode_batch_size)
        self.decode_batch_size = int(decode_batch_size)

        te1, te2, te3 = text_encoders
        tok1, tok2, tok3 = tokenizers
        if te1 is None or te2 is None or tok1 is None or tok2 is None:
            raise SD3Error("SD3Backend needs both CLIP text encoders and their tokenizers")
        self.transformer = _to(transformer, self.device, self.dtype)
        self.transformer.requires_grad_(False)
        self.vae = _to(vae, self.device, _dtype(vae_dtype))
        self.vae.requires_grad_(False)
        for te in (te1, te2, te3):
            if te is not None:
                _to(te, self.device, self.dtype).requires_grad_(False).eval()
        self.vae.eval()
        # The pipeline object only borrows the components (no copies): we use its encode_prompt, so
        # prompt embeddings are diffusers' to the bit, and hand it to users who want its __call__.
        self.pipe = diffusers.StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(
                shift=float(self.sampling["shift"])),
            vae=self.vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
            text_encoder_3=te3, tokenizer_3=tok3 if te3 is not None else None)
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution) if resolution is not None else int(self.transformer.config.sample_size) * vae_scale
        patch = int(self.transformer.config.patch_size)
        if self.resolution % (vae_scale * patch):
            raise SD3Error(f"resolution {self.resolution} must be a multiple of {vae_scale * patch} "
                           f"(VAE factor {vae_scale} x patch size {patch})")
        self._latent_shape = (int(self.transformer.config.in_channels), self.resolution // vae_scale,
                              self.resolution // vae_scale)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.adapters: list[str] = []
        self._trainable: set[str] = set()
        self._active: str | None = None
        self._enabled = True
        self._adapter_params: dict[str, list[torch.nn.Parameter]] = {}
        self.forward_module = None
        mp = None if mixed_precision in (None, "", "none", "no") else _dtype(mixed_precision)
        if mp is not None and mp == torch.float32:
            mp = None
        self.autocast_dtype = mp
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | Path, *, device="cpu", dtype="bf16", drop_t5: bool = False,
                        local_files_only: bool | None = None, **kwargs) -> "SD3Backend":
        """Load the components of a StableDiffusion3Pipeline from a local directory or a hub id
        (e.g. stabilityai/stable-diffusion-3.5-medium). kwargs go to the constructor."""
        diffusers = _diffusers()
        model = str(model)
        p = Path(model).expanduser()
        looks_local = p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
        if looks_local and not (p / "model_index.json").is_file():
            raise SD3Error(f"{model}: not a diffusers StableDiffusion3Pipeline directory (no model_index.json)"
                           if p.exists() else f"model not found: {model} (a local directory or a hub id like "
                           "stabilityai/stable-diffusion-3.5-medium)")
        extra = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        src = str(p) if looks_local else model
        local = local_files_only if local_files_only is not None else looks_local
        vae_dtype = _dtype(kwargs.get("vae_dtype", "fp32"))
        try:
            with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones need it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                # the VAE is read in its own dtype (float32 by default), not rounded through `dtype`
                vae = diffusers.AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype,
                                                              local_files_only=local)
                pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
                    src, torch_dtype=_dtype(dtype), local_files_only=local, vae=vae, **extra)
        except (OSError, ValueError) as e:
            raise SD3Error(f"cannot load the SD3 pipeline {model}: {e}") from None
        sampling = dict(kwargs.pop("sampling", None) or {})
        sampling.setdefault("shift", float(pipe.scheduler.config.get("shift", 3.0)))
        return cls(pipe.transformer, pipe.vae, (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3),
                   (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), device=device, dtype=dtype,
                   sampling=sampling, model_id=model, scheduler=pipe.scheduler, **kwargs)

    # ---- the Backend interface -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (None = the empty, unconditional prompt) -> (prompt_embeds (B, 77 + T, D),
        pooled (B, P)), cached per prompt string."""
        keys = ["" if p is None else str(p) for p in prompts]
        missing = [k for k in dict.fromkeys(keys) if k not in self._cache]
        for i in range(0, len(missing), self.encode_batch_size):
            chunk = missing[i:i + self.encode_batch_size]
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompt=chunk, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            for k, e, p in zip(chunk, emb, pooled):
                self._cache[k] = (e.to(self.dtype).clone(), p.to(self.dtype).clone())
        for k in keys:
            self._cache.move_to_end(k)
        out = (torch.stack([self._cache[k][0] for k in keys]), torch.stack([self._cache[k][1] for k in keys]))
        while len(self._cache) > max(self.prompt_cache_size, len(set(keys))):
            self._cache.popitem(last=False)
        return out

    def velocity(self, x: torch.Tensor, sigma, cond) -> torch.Tensor:
        """v = noise - x0 predicted at x (B, C, h, w), sigma (B,) or scalar; float32 (B, C, h, w)."""
        if not torch.is_tensor(sigma) or sigma.ndim == 0:
            sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
        emb, pooled = cond
        timestep = sigma.to(self.device, torch.float32) * 1000.0  # diffusers: timesteps = sigmas * 1000
        net = self.forward_module if self.forward_module is not None else self.transformer
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        with amp:
            out = net(hidden_states=x.to(self.device, self.dtype), timestep=timestep,
                      encoder_hidden_states=emb.to(self.device, self.dtype),
                      pooled_projections=pooled.to(self.device, self.dtype), return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) -> uint8 images (B, H, W, 3)."""
        cfg = self.vae.config
        out = []
        for chunk in x.split(self.decode_batch_size):
            z = chunk.to(self.device, self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = self.vae.decode(z, return_dict=False)[0]
            img = (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
            out.append((img.cpu().numpy() * 255).round().astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)

    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ---- adapters --------------------------------------------------------------------------------
    @property
    def model(self):
        """The transformer (`backend.model.requires_grad_(True)` = full fine-tuning, as TinyBackend)."""
        return self.transformer

    def add_adapter(self, name: str, rank: int = LORA_RANK, alpha: float | None = LORA_ALPHA, targets=None,
                    init: bool | str = "gaussian", trainable: bool = True, config=None):
        """Add a named LoRA over the frozen transformer and make it active. init: peft's
        init_lora_weights ("gaussian" as Flow-GRPO: B = 0, so the adapter starts as the identity;
        False: random A and B, a non-trivial adapter for tests). `config`: a ready LoraConfig."""
        from peft import LoraConfig  # peft imports transformers (heavy): only when adapters are used

        if name in self.adapters:
            raise SD3Error(f"adapter {name!r} exists already; have {self.adapters}")
        cfg = config or LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), init_lora_weights=init,
                                   target_modules=list(targets or LORA_TARGETS), lora_dropout=0.0)
        with warnings.catch_warnings():  # peft warns that a model with adapters gets another one: we mean it
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.transformer.add_adapter(cfg, adapter_name=name)
        self._register(name, trainable)

    def _register(self, name: str, trainable: bool):
        BaseTunerLayer = _peft_tuner_layer()
        params = []
        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                for layer_name in module.adapter_layer_names:
                    d = getattr(module, layer_name)
                    if name in d:
                        d[name].to(dtype=self.lora_dtype)
                        params.extend(d[name].parameters())
        if not params:
            raise SD3Error(f"adapter {name!r} matched no module of the transformer")
        self._adapter_params[name] = params
        self.adapters.append(name)
        if trainable:
            self._trainable.add(name)
        self.set_adapter(name)

    def set_trainable(self, name: str, trainable: bool = True):
        """Mark an adapter as trained (it gets gradients while active) or frozen (a teacher)."""
        self._check(name)
        (self._trainable.add if trainable else self._trainable.discard)(name)
        self._sync_grad()

    def set_adapter(self, name: str):
        self._check(name)
        self.transformer.set_adapter(name)
        if not self._enabled:
            self.transformer.enable_adapters()
            self._enabled = True
        self._active = name
        self._sync_grad()

    @property
    def active_adapter(self) -> str | None:
        """The adapter in use, or None when adapters are off (the base)."""
        return self._active if self._enabled else None

    @contextmanager
    def adapter(self, name: str | None):
        """Run a block with adapter `name` active (None: the base, adapters off), then restore."""
        if name is not None:
            self._check(name)
        if not self.adapters:
            yield
            return
        prev, prev_enabled = self._active, self._enabled
        try:
            if name is None:
                if self._enabled:
                    self.transformer.disable_adapters()
                    self._enabled = False
                    self._sync_grad()
            else:
                self.set_adapter(name)
            yield
        finally:
            if prev is not None:
                self.set_adapter(prev)
            if not prev_enabled and self._enabled:
                self.transformer.disable_adapters()
                self._enabled = False
                self._sync_grad()

    @contextmanager
    def merged(self, name: str | None = None):
        """`adapter(name)` (None: as now). The adapter is not folded into the weights here: added to bf16
        transformer weights, the part of a LoRA delta below bf16's resolution would round away."""
        if name is None:
            yield
            return
        with self.adapter(name):
            yield

    def _check(self, name: str):
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {self.adapters}")

    def _sync_grad(self):
        for a, params in self._adapter_params.items():
            on = self._enabled and a == self._active and a in self._trainable
            for p in params:
                p.requires_grad_(on)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights with diffusers/peft keys (transformer_blocks.0.attn.to_q.lora_A.weight)."""
        from peft.utils import get_peft_model_state_dict  # heavy (transformers), as in add_adapter

        self._check(name)
        return get_peft_model_state_dict(self.transformer, adapter_name=name)

    def adapter_config(self, name: str):
        self._check(name)
        return self.transformer.peft_config[name]

    def read_lora(self, name: str) -> tuple[Lora, int, float, list[str]]:
        """Adapter `name` as (lora {module: (A, B)}, rank, alpha, targets)."""
        c = self.adapter_config(name)
        if getattr(c, "rank_pattern", None) or getattr(c, "alpha_pattern", None):
            raise ConfigError(f"adapter {name!r} has per-module ranks or alphas; the merge needs one rank and alpha")
        return lora_from_state_dict(self.adapter_state_dict(name)), int(c.r), float(c.lora_alpha), sorted(c.target_modules)

    def attach_lora(self, name: str, lora: Lora, rank: int, alpha: float, targets, trainable: bool = True) -> str:
        """Add `lora` ({module: (A, B)}) as adapter `name` (it becomes active)."""
        from peft import set_peft_model_state_dict  # heavy (transformers), as in add_adapter

        self.add_adapter(name, rank=rank, alpha=alpha, targets=list(targets), trainable=trainable)
        sd = {}
        for m, (A, B) in lora.items():
            sd[f"{m}.lora_A.weight"] = A.contiguous()
            sd[f"{m}.lora_B.weight"] = B.contiguous()
        res = set_peft_model_state_dict(self.transformer, sd, adapter_name=name)
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
        missing = [k for k in getattr(res, "missing_keys", []) if f".{name}." in k and "lora" in k]
        if bad or missing:
            raise ConfigError(f"adapter {name!r} does not fit the transformer: unexpected {bad[:2]}, missing {missing[:2]}")
        return name

    # ---- LoRA files ------------------------------------------------------------------------------
    def save_lora(self, name: str, out: str | Path, is_main_process: bool = True) -> Path:
        """Write adapter `name` in diffusers' LoRA format: out/pytorch_lora_weights.safetensors, keys
        `transformer.<module>.lora_{A,B}.weight`, the LoraConfig (rank, alpha, targets) as metadata.
        `StableDiffusion3Pipeline.load_lora_weights(out)` loads it."""
        diffusers = _diffusers()
        out = Path(out)
        sd = {k: v.detach().float().cpu().contiguous() for k, v in self.adapter_state_dict(name).items()}
        meta = self.adapter_config(name).to_dict()
        meta.pop("base_model_name_or_path", None)
        diffusers.StableDiffusion3Pipeline.save_lora_weights(
            str(out), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta,
            is_main_process=is_main_process, weight_name=LORA_WEIGHT_NAME)
        return out

    def load_lora(self, name: str, path: str | Path, trainable: bool = False) -> str:
        """Add adapter `name` from a LoRA in diffusers' format (a directory with
        pytorch_lora_weights.safetensors, or that file) or peft's (a directory with adapter_config.json
        and adapter_model.safetensors, e.g. Flow-GRPO's released checkpoints); `path` may be a hub id. Loaded adapters are frozen
        (teachers) unless trainable=True. The previously active adapter stays active."""
        from peft import LoraConfig, set_peft_model_state_dict  # heavy (transformers), as in add_adapter

        if name in self.adapters:
            raise SD3Error(f"adapter {name!r} exists already; have {self.adapters}")
        p = _local_or_hub(path)
        prev = self.active_adapter
        if (p / "adapter_config.json").is_file():  # peft format
            cfg = LoraConfig.from_pretrained(str(p))
            files = [p / "adapter_model.safetensors", p / "adapter_model.bin"]
            f = next((x for x in files if x.is_file()), None)
            if f is None:
                raise SD3Error(f"{p}: adapter_config.json but no adapter_model.safetensors")
            sd = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(str(f), weights_only=True)
            sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
            self.add_adapter(name, config=cfg, trainable=trainable)
            res = set_peft_model_state_dict(self.transformer, sd, adapter_name=name)
            bad = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
            if bad:
                raise SD3Error(f"{p}: adapter does not fit this transformer (unexpected {bad[:2]})")
        else:  # diffusers format
            f = p if p.is_file() else p / LORA_WEIGHT_NAME
            if not f.is_file():
                raise SD3Error(f"no LoRA found at {p} (expected {LORA_WEIGHT_NAME} or adapter_config.json)")
            try:
                with safe_open(str(f), "pt") as fh:  # pipeline files prefix keys with "transformer."; a
                    keys = list(fh.keys())            # transformer's own save_lora_adapter does not
                prefix = "transformer" if any(k.startswith("transformer.") for k in keys) else None
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    self.transformer.load_lora_adapter(str(f.parent), weight_name=f.name, prefix=prefix,
                                                       adapter_name=name)
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                raise SD3Error(f"cannot load the LoRA at {f}: {e}") from None
            self._register(name, trainable)
        if prev is not None:
            self.set_adapter(prev)
        return name

    # ---- checkpoints -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"backend": "sd3", "model": self.model_id, "resolution": self.resolution,
                "dtype": str(self.dtype).removeprefix("torch."), "max_sequence_length": self.max_sequence_length,
                "sampling": self.sampling}

    def save_checkpoint(self, out: str | Path, adapters: list[str] | None = None, meta: dict | None = None,
                        base: str | Path | None = None, is_main_process: bool = True) -> Path:
        """A flowopd SD3 checkpoint: out/config.json (the base model id, sampling defaults, the adapters
        with rank, alpha and targets) + out/adapters/<name>/ in diffusers' LoRA format. The base
        weights are not copied: config.json names them (`base` is unused: the model id is the base)."""
        out = Path(out)
        names = list(self.adapters if adapters is None else adapters)
        conf = self.config_dict() | {"meta": meta or {}, "adapters": {}}
        for n in names:
            self.save_lora(n, out / "adapters" / n, is_main_process=is_main_process)
            c = self.adapter_config(n)
            conf["adapters"][n] = {"dir": f"adapters/{n}", "rank": int(c.r), "alpha": float(c.lora_alpha),
                                   "targets": sorted(c.target_modules)}
        if is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(conf, indent=2))
        return out


    def save_adapter_checkpoint(self, out: str | Path, name: str, base: str | Path, meta: dict) -> Path:
        """Adapter `name` alone as a checkpoint (save_checkpoint with that one adapter)."""
        return self.save_checkpoint(out, adapters=[name], meta=meta, base=base)


def load_sd3_checkpoint(path: str | Path, *, device="cpu", dtype="bf16", model: str | None = None,
                        trainable: str | None = None, **kwargs) -> SD3Backend:
    """Load a checkpoint written by `SD3Backend.save_checkpoint`: the base named in config.json (or
    `model`) with every adapter (frozen, except `trainable`); the last adapter listed is active."""
    p = Path(path)
    try:
        conf = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SD3Error(f"{p}/config.json is missing or not valid JSON: {e}") from None
    if conf.get("backend") != "sd3":
        raise SD3Error(f"{p}: backend {conf.get('backend')!r} is not sd3")
    kwargs.setdefault("resolution", conf.get("resolution", 512))
    kwargs.setdefault("max_sequence_length", conf.get("max_sequence_length", 128))
    kwargs.setdefault("sampling", conf.get("sampling"))
    backend = SD3Backend.from_pretrained(model or conf["model"], device=device, dtype=dtype, **kwargs)
    for name, a in (conf.get("adapters") or {}).items():
        backend.load_lora(name, p / a["dir"], trainable=(name == trainable))
    if backend.adapters:
        backend.set_adapter(backend.adapters[-1])
    return backend


__all__ = ["LORA_ALPHA", "LORA_RANK", "LORA_TARGETS", "SD3Backend", "SD3Error", "load_sd3_checkpoint"]
