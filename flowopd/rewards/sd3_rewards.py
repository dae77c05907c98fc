"""Rewards of the SD3.5 experiments: OCR, PickScore, CLIP score, LAION aesthetic, and the reward-server
clients GenEval, DeQA-Score and UnifiedReward.

Every reward is a function `(images uint8 (B, H, W, 3), prompts (B,), metadata (B,) or None) ->
torch.Tensor (B,)` built by a factory in `SD3_REWARDS` (models are loaded once, when the factory
runs). Heavy dependencies are imported lazily; a missing one raises `RewardDependencyError` (a
UserError) naming the package, the extra and the file. Model locations default to the hub ids the
papers used and can be set by argument or environment variable (a local directory works offline).

Definitions (each as in Flow-GRPO's code, yifan123/flow_grpo, unless said otherwise):
  - ocr: target = the text between the first pair of double quotes of the prompt (or
    metadata["text"]); both strings lowercased with whitespace removed; distance = 0 if the target
    occurs in the recognised text, else the Levenshtein distance, capped at len(target);
    reward = 1 - distance / len(target). Engine: Tesseract through pytesseract (the Debian package
    `tesseract-ocr`; offline), or PaddleOCR (Flow-GRPO's engine; optional). Flow-GRPO joins
    PaddleOCR's boxes without separators and removes spaces; for Tesseract we remove all
    whitespace (its output has newlines), which is the same thing.
  - pickscore: logit_scale.exp() * cos(text, image) of PickScore_v1 (a CLIP-H fine-tune, processor
    from laion/CLIP-ViT-H-14-laion2B-s32B-b79K), divided by 26 (Flow-GRPO's "norm to 0-1"; pass
    scale=1 for the raw PickScore that papers report, ~21-23 for SD3.5-M).
  - clipscore: logit_scale.exp() * cos(text, image) of openai/clip-vit-large-patch14, divided by 30
    (Flow-GRPO's ClipScorer). Images go through the CLIP processor (PIL resize), not Flow-GRPO's
    torchvision transform: values can differ by interpolation.
  - aesthetic: the LAION improved aesthetic predictor: an MLP (768-1024-128-64-16-1) over the
    L2-normalised CLIP ViT-L/14 image embedding; weights from a local file
    (sac+logos+ava1-l14-linearMSE.pth, or a .safetensors with the same keys layers.{0,2,4,6,7}.*).
  - geneval: a client of Flow-GRPO's reward server (yifan123/reward-server, app_geneval.py): POST
    to the server's root a pickled dict {"images": [JPEG bytes], "meta_datas": [GenEval metadata
    ({"tag", "include", "exclude", "prompt"})], "only_strict": bool}; the answer is a pickled dict
    {"scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards"}. The reward is
    "scores" (what Flow-GRPO trains on). Batches of 64, JPEG at PIL's default quality, URL
    http://127.0.0.1:18085 by default (Flow-GRPO's). Departures: a bounded number of retries with
    exponential back-off on connection errors and 5xx answers (Flow-GRPO: 1000 retries on 500),
    and answers are unpickled with an allow-list (plain containers, numbers, numpy arrays): a
    server cannot make the trainer run code.
  - deqa, unifiedreward: clients of the servers of the quality (DeQA-Score) and preference
    (UnifiedReward) models, which need their own environments; the protocol of the Flow-OPD
    authors' flow_grpo/rewards.py (deqa_score_remote, unifiedreward_score_remote): POST a pickled
    {"images": [JPEG bytes]} (unifiedreward: + "prompts"), answer a pickled {"outputs": [score]};
    the reward is the raw score (DeQA: 1-5, as the authors mix it in with weight 0.2). Same client
    as geneval (batches of 64, time-outs, bounded retries, restricted unpickling); loopback URLs by
    default: FLOWOPD_DEQA_URL or http://127.0.0.1:18086, FLOWOPD_UNIFIEDREWARD_URL or
    http://127.0.0.1:17140 (the authors' ports). Departure: the authors' multi_score routes
    "unifiedreward" to an OpenAI-compatible sglang endpoint (unifiedreward_score_sglang) that parses
    a score out of generated text; we speak the pickle protocol of their unifiedreward_score_remote.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..errors import UserError

RewardFn = Callable[..., torch.Tensor]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
GENEVAL_URL = "http://127.0.0.1:18085"
DEQA_URL = "http://127.0.0.1:18086"
UNIFIEDREWARD_URL = "http://127.0.0.1:17140"


class RewardDependencyError(UserError, ImportError):
    """A reward's package, binary, model or weight file is missing: the message says how to get it."""


class RewardServerError(UserError, RuntimeError):
    """The reward server could not be reached or answered with an error after all retries."""


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def _require(module: str, pip: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RewardDependencyError(
            f"this reward needs the Python package {pip!r}: pip install '{pip}' "
            f"(or pip install 'flowopd[{extra}]')") from None


def _pil_images(images) -> list:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {arr.dtype} {arr.shape}")
    return [Image.fromarray(a) for a in arr]


def _device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# ----------------------------------------------------------------------------- OCR


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_target(prompt: str, metadata: dict | None = None) -> str:
    """The text a prompt asks to render: metadata["text"] if given, else the text between the first
    pair of double quotes (Flow-GRPO: prompt.split('"')[1]); curly quotes are accepted too."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    parts = prompt.split('"')
    if len(parts) >= 3:
        return parts[1]
    m = re.search(r"[\u201c](.*?)[\u201d]", prompt)
    return m.group(1) if m else ""


def ocr_reward_from_text(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward: 1 - min(d, len(t)) / len(t), d = 0 if t occurs in the recognised text
    else the edit distance; both strings lowercased, whitespace removed. An empty target gives 0."""
    rec = re.sub(r"\s+", "", recognized).lower()
    tgt = re.sub(r"\s+", "", target).lower()
    if not tgt:
        return 0.0
    dist = 0 if tgt in rec else min(edit_distance(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


def _tesseract_reader(lang: str = "eng", config: str = "--psm 3"):
    pytesseract = _require("pytesseract", "pytesseract", "ocr")
    try:
        pytesseract.get_tesseract_version()
    except Exception:  # pytesseract raises its own TesseractNotFoundError
        raise RewardDependencyError("the OCR reward needs the tesseract binary: apt-get install tesseract-ocr "
                                    "(Debian/Ubuntu) or set pytesseract.pytesseract.tesseract_cmd") from None

    def read(img) -> str:
        return pytesseract.image_to_string(img, lang=lang, config=config)

    return read


def _paddle_reader(use_gpu: bool = False):
    paddleocr = _require("paddleocr", "paddleocr", "paddle")
    try:  # PaddleOCR 3.x
        ocr = paddleocr.PaddleOCR(lang="en", use_textline_orientation=False)
    except TypeError:  # PaddleOCR 2.x, Flow-GRPO's setting
        ocr = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", use_gpu=use_gpu, show_log=False)

    def read(img) -> str:
        arr = np.asarray(img)
        if hasattr(ocr, "predict"):
            res = ocr.predict(arr)
            return "".join("".join(r.get("rec_texts", []) if hasattr(r, "get") else []) for r in res or [])
        res = ocr.ocr(arr, cls=False)
        boxes = res[0] if res and res[0] else []
        return "".join(b[1][0] for b in boxes if b[1][1] > 0)

    return read


def make_ocr_reward(engine: str | None = None, lang: str = "eng", tesseract_config: str = "--psm 3",
                    use_gpu: bool = False) -> RewardFn:
    """OCR reward (module doc). engine: "tesseract" (default; env FLOWOPD_OCR_ENGINE) or "paddle"."""
    engine = (engine or _env("FLOWOPD_OCR_ENGINE", "tesseract")).lower()
    if engine == "tesseract":
        read = _tesseract_reader(lang, tesseract_config)
    elif engine in ("paddle", "paddleocr"):
        read = _paddle_reader(use_gpu)
    else:
        raise UserError(f"unknown OCR engine {engine!r}; use tesseract or paddle")
    warned = []

    def ocr(images, prompts, metadata=None) -> torch.Tensor:
        out = []
        for i, (img, prompt) in enumerate(zip(_pil_images(images), prompts)):
            target = ocr_target(prompt, metadata[i] if metadata else None)
            if not target and not warned:
                warned.append(prompt)
                warnings.warn(f"OCR reward: no quoted text in prompt {prompt!r}; its reward is 0", stacklevel=2)
            try:
                text = read(img) if target else ""
            except Exception as e:  # an OCR failure on one image scores it 0, as Flow-GRPO does
                warnings.warn(f"OCR failed on image {i}: {e}", stacklevel=2)
                text = ""
            out.append(ocr_reward_from_text(text, target))
        return torch.tensor(out, dtype=torch.float32)

    return ocr


# ----------------------------------------------------------------------------- CLIP family


def _load_clip(model: str, processor: str | None, device, dtype):
    transformers = _require("transformers", "transformers", "sd3")
    try:
        proc = transformers.CLIPProcessor.from_pretrained(processor or model)
        net = transformers.CLIPModel.from_pretrained(model).eval().to(device, dtype)
    except (OSError, ValueError) as e:  # a missing directory reads as a malformed hub id (ValueError)
        raise RewardDependencyError(f"cannot load CLIP model {model!r} / processor {processor or model!r} "
                                    f"(a local directory or a hub id): {e}") from None
    net.requires_grad_(False)
    return proc, net


def _features(out) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 a BaseModelOutputWithPooling holding them."""
    return out if torch.is_tensor(out) else out.pooler_output


def _clip_similarity(proc, net, device, images, prompts, scale: float) -> torch.Tensor:
    with torch.no_grad():
        img_in = proc(images=_pil_images(images), return_tensors="pt")
        txt_in = proc(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        dtype = next(net.parameters()).dtype
        img = _features(net.get_image_features(pixel_values=img_in["pixel_values"].to(device, dtype)))
        txt = _features(net.get_text_features(**{k: v.to(device) for k, v in txt_in.items()}))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        s = net.logit_scale.exp() * (img * txt).sum(-1)
    return (s.float() * scale).cpu()


def make_pickscore_reward(model: str | None = None, processor: str | None = None, device=None,
                          dtype=torch.float32, scale: float = 1 / 26) -> RewardFn:
    """PickScore (module doc). model: env FLOWOPD_PICKSCORE_MODEL or yuvalkirstain/PickScore_v1;
    processor: env FLOWOPD_PICKSCORE_PROCESSOR or laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    device = _device(device)
    proc, net = _load_clip(model or _env("FLOWOPD_PICKSCORE_MODEL", PICKSCORE_MODEL),
                           processor or _env("FLOWOPD_PICKSCORE_PROCESSOR", PICKSCORE_PROCESSOR), device, dtype)

    def pickscore(images, prompts, metadata=None) -> torch.Tensor:
        return _clip_similarity(proc, net, device, images, prompts, scale)

    return pickscore


def make_clip_score_reward(model: str | None = None, device=None, dtype=torch.float32,
                           scale: float = 1 / 30) -> RewardFn:
    """CLIP score (module doc). model: env FLOWOPD_CLIP_MODEL or openai/clip-vit-large-patch14."""
    device = _device(device)
    name = model or _env("FLOWOPD_CLIP_MODEL", CLIP_MODEL)
    proc, net = _load_clip(name, name, device, dtype)

    def clipscore(images, prompts, metadata=None) -> torch.Tensor:
        return _clip_similarity(proc, net, device, images, prompts, scale)

    return clipscore


def aesthetic_mlp(in_dim: int = 768) -> torch.nn.Sequential:
    """The LAION improved-aesthetic-predictor head; its state-dict keys are layers.{0,2,4,6,7}.*"""
    nn = torch.nn
    mlp = nn.Module()
    mlp.layers = nn.Sequential(nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                               nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return mlp


def make_aesthetic_reward(weights: str | Path | None = None, clip_model: str | None = None, device=None,
                          dtype=torch.float32) -> RewardFn:
    """LAION aesthetic predictor (module doc). weights: env FLOWOPD_AESTHETIC_WEIGHTS, a local
    .pth/.safetensors file; clip_model: env FLOWOPD_CLIP_MODEL or openai/clip-vit-large-patch14."""
    path = weights or _env("FLOWOPD_AESTHETIC_WEIGHTS", None)
    if not path or not Path(path).is_file():
        raise RewardDependencyError(
            "the aesthetic reward needs the LAION predictor weights as a local file "
            f"({'not found: ' + str(path) if path else 'none given'}): download sac+logos+ava1-l14-linearMSE.pth "
            "from the LAION-AI/aesthetic-predictor project and pass weights=PATH or set FLOWOPD_AESTHETIC_WEIGHTS")
    if str(path).endswith(".safetensors"):
        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    try:
        mlp = aesthetic_mlp(int(sd["layers.0.weight"].shape[1]))
        mlp.load_state_dict(sd)
    except (KeyError, RuntimeError) as e:
        raise RewardDependencyError(f"{path} is not an aesthetic-predictor state dict: {e}") from None
    device = _device(device)
    name = clip_model or _env("FLOWOPD_CLIP_MODEL", CLIP_MODEL)
    proc, net = _load_clip(name, name, device, dtype)
    mlp = mlp.eval().to(device, dtype).requires_grad_(False)

    def aesthetic(images, prompts, metadata=None) -> torch.Tensor:
        with torch.no_grad():
            px = proc(images=_pil_images(images), return_tensors="pt")["pixel_values"].to(device, dtype)
            emb = _features(net.get_image_features(pixel_values=px))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return mlp.layers(emb).squeeze(1).float().cpu()

    return aesthetic


# ----------------------------------------------------------------------------- GenEval server


class _SafeUnpickler(pickle.Unpickler):
    """Only plain containers, numbers and numpy arrays/scalars may come back from a reward server."""

    ALLOWED = {("builtins", n) for n in ("list", "dict", "tuple", "set", "frozenset", "float", "int", "str",
                                         "bool", "complex", "bytes")} | {
        ("collections", "defaultdict"), ("collections", "OrderedDict"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Float32DType"), ("numpy.dtypes", "Int64DType"),
        ("numpy.dtypes", "BoolDType"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"reward server answer holds a disallowed object {module}.{name}")


def _safe_loads(data: bytes):
    return _SafeUnpickler(io.BytesIO(data)).load()


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")  # PIL's default quality (75), as Flow-GRPO
    return buf.getvalue()


def post_pickle(url: str, payload: dict, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0,
                max_backoff: float = 30.0) -> dict:
    """POST a pickled dict, return the unpickled answer; retry connection errors, time-outs and 5xx."""
    data = pickle.dumps(payload)
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), max_backoff))
        req = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return _safe_loads(resp.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace").strip().splitlines()
            last = f"HTTP {e.code}: {body[-1] if body else e.reason}"
            if e.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise RewardServerError(f"reward server {url} failed after {attempt + 1} attempt(s): {last}")


def server_scores(url: str, images, payload: Callable[[int, int, list], dict], field: str, batch_size: int = 64,
                  **post) -> torch.Tensor:
    """Score images on a reward server in batches: POST payload(lo, hi, [JPEG bytes of images[lo:hi]])
    (post_pickle: time-outs, retries), read the list answer[field], one float per image. (B,)"""
    pils = _pil_images(images)
    out = []
    for lo in range(0, len(pils), batch_size):
        hi = min(lo + batch_size, len(pils))
        ans = post_pickle(url, payload(lo, hi, [_jpeg(p) for p in pils[lo:hi]]), **post)
        if not isinstance(ans, dict) or field not in ans:
            raise RewardServerError(f"reward server {url} answered without {field!r} "
                                    f"(keys: {sorted(ans) if isinstance(ans, dict) else type(ans).__name__})")
        vals = [float(v) for v in ans[field]]
        if len(vals) != hi - lo:
            raise RewardServerError(f"reward server {url} returned {len(vals)} {field} for {hi - lo} images")
        out.extend(vals)
    return torch.tensor(out, dtype=torch.float32)


def make_deqa_reward(url: str | None = None, batch_size: int = 64, timeout: float = 120.0, retries: int = 5,
                     backoff: float = 1.0) -> RewardFn:
    """DeQA-Score image quality (1-5) from its reward server (module doc). url: env FLOWOPD_DEQA_URL
    or http://127.0.0.1:18086. Prompts are not sent."""
    url = url or _env("FLOWOPD_DEQA_URL", DEQA_URL)

    def deqa(images, prompts, metadata=None) -> torch.Tensor:
        return server_scores(url, images, lambda lo, hi, jpegs: {"images": jpegs}, "outputs", batch_size,
                             timeout=timeout, retries=retries, backoff=backoff)

    return deqa


def make_unifiedreward_reward(url: str | None = None, batch_size: int = 64, timeout: float = 120.0,
                              retries: int = 5, backoff: float = 1.0) -> RewardFn:
    """UnifiedReward preference score of (image, prompt) from its reward server (module doc).
    url: env FLOWOPD_UNIFIEDREWARD_URL or http://127.0.0.1:17140."""
    url = url or _env("FLOWOPD_UNIFIEDREWARD_URL", UNIFIEDREWARD_URL)

    def unifiedreward(images, prompts, metadata=None) -> torch.Tensor:
        return server_scores(url, images, lambda lo, hi, jpegs: {"images": jpegs, "prompts": list(prompts[lo:hi])},
                             "outputs", batch_size, timeout=timeout, retries=retries, backoff=backoff)

    return unifiedreward


def make_geneval_reward(url: str | None = None, batch_size: int = 64, only_strict: bool = True,
                        field: str = "scores", timeout: float = 120.0, retries: int = 5,
                        backoff: float = 1.0) -> RewardFn:
    """GenEval through Flow-GRPO's reward server (module doc). url: env FLOWOPD_GENEVAL_URL or
    http://127.0.0.1:18085; field: which answer list is the reward ("scores", as Flow-GRPO;
    "rewards" or "strict_rewards" for the 0/1 accuracies)."""
    url = url or _env("FLOWOPD_GENEVAL_URL", GENEVAL_URL)

    def geneval(images, prompts, metadata=None) -> torch.Tensor:
        if metadata is None or len(metadata) != len(prompts):
            raise UserError("the geneval reward needs GenEval metadata ({'tag', 'include', ...}) for every sample")
        for i, m in enumerate(metadata):
            missing = [k for k in ("tag", "include") if k not in m]
            if missing:
                raise UserError(f"geneval reward: metadata of sample {i} ({prompts[i]!r}) lacks {missing}; "
                                "use GenEval prompts with their metadata (Flow-GRPO's dataset/geneval)")
        return server_scores(url, images, lambda lo, hi, jpegs: {
            "images": jpegs, "meta_datas": [dict(m) for m in metadata[lo:hi]], "only_strict": bool(only_strict)},
            field, batch_size, timeout=timeout, retries=retries, backoff=backoff)

    return geneval


# ----------------------------------------------------------------------------- registry


SD3_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "ocr": make_ocr_reward,
    "pickscore": make_pickscore_reward,
    "clipscore": make_clip_score_reward,
    "aesthetic": make_aesthetic_reward,
    "geneval": make_geneval_reward,
    "deqa": make_deqa_reward,
    "unifiedreward": make_unifiedreward_reward,
}


def lazy(factory: Callable[..., RewardFn], **kwargs) -> RewardFn:
    """A reward function that builds its scorer with `factory(**kwargs)` on first call (so that a
    registry can list SD3 rewards without loading models or needing their packages)."""
    built: list[RewardFn] = []

    def reward(images, prompts, metadata=None) -> torch.Tensor:
        if not built:
            built.append(factory(**kwargs))
        return built[0](images, prompts, metadata)

    reward.__name__ = getattr(factory, "__name__", "reward").removeprefix("make_").removesuffix("_reward")
    reward.__doc__ = factory.__doc__
    return reward


__all__ = ["SD3_REWARDS", "RewardDependencyError", "RewardServerError", "aesthetic_mlp", "edit_distance", "lazy",
           "make_aesthetic_reward", "make_clip_score_reward", "make_deqa_reward", "make_geneval_reward",
           "make_ocr_reward", "make_pickscore_reward", "make_unifiedreward_reward", "ocr_reward_from_text", "ocr_target",
           "post_pickle", "server_scores"]
