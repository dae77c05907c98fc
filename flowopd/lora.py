"""LoRA arithmetic: dense deltas of LoRA factors, the exact merge by concatenation, the best low-rank
fit by SVD, and the peft state-dict key layout. Pure tensor code: no model, no files.

A LoRA is a dict {module path (e.g. "down1.conv1"): (A, B)} of unscaled factors as peft stores
them; its dense delta on the module's weight is scale * B @ A, scale = alpha / rank.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from .errors import CheckpointError

PEFT_PREFIX = "base_model.model."

Lora = dict  # module path (e.g. "down1.conv1") -> (A, B), unscaled factors as peft stores them


def lora_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Dense weight delta of one LoRA module: scale * B @ A, in the shape of the base weight.

    Linear: A (r, in), B (out, r) -> (out, in).
    Conv2d: A (r, in, kh, kw) (a conv), B (out, r, 1, 1) (a 1x1 conv) -> (out, in, kh, kw):
            delta[o, i, h, w] = scale * sum_r B[o, r] A[r, i, h, w].
    """
    A, B = A.double(), B.double()
    d = B.flatten(1) @ A.flatten(1)  # (out, in * kh * kw)
    return (scale * d).view(B.shape[0], *A.shape[1:]).float()


@contextmanager
def weights_added(pairs: list[tuple[Tensor, Tensor]]):
    """A block in which each weight holds weight + delta (pairs of (weight, delta), changed in place,
    no gradients); every weight is copied back bit for bit on exit, also when the block raises."""
    saved = [(w, w.detach().clone()) for w, _ in pairs]
    try:
        with torch.no_grad():
            for w, d in pairs:
                w.add_(d.to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for w, w0 in saved:
                w.copy_(w0)


def lora_deltas(lora: Lora, scale: float) -> dict[str, Tensor]:
    """{base weight key ("down1.conv1.weight"): dense delta} of every module of a LoRA."""
    return {f"{m}.weight": lora_delta(A, B, scale) for m, (A, B) in lora.items()}


def lora_from_state_dict(sd: dict[str, Tensor]) -> Lora:
    """peft adapter state dict ("base_model.model.<module>.lora_A.weight", ...) -> {module: (A, B)}."""
    out: dict[str, list] = {}
    for k, v in sd.items():
        for i, tag in enumerate((".lora_A.weight", ".lora_B.weight")):
            if k.endswith(tag):
                m = k[: -len(tag)]
                m = m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m
                out.setdefault(m, [None, None])[i] = v.detach().float().cpu()
    bad = [m for m, ab in out.items() if ab[0] is None or ab[1] is None]
    if bad:
        raise CheckpointError(f"LoRA state has A without B (or B without A) for {bad[:3]}")
    return {m: (a, b) for m, (a, b) in out.items()}


def lora_to_state_dict(lora: Lora) -> dict[str, Tensor]:
    """{module: (A, B)} -> adapter state dict keys in peft's layout (what peft loads back into a model)."""
    sd = {}
    for m, (A, B) in lora.items():
        sd[f"{PEFT_PREFIX}{m}.lora_A.weight"] = A.contiguous()
        sd[f"{PEFT_PREFIX}{m}.lora_B.weight"] = B.contiguous()
    return sd


def concat_loras(loras: list[Lora], scales: list[float], weights: list[float]) -> Lora:
    """Exact LoRA of the weighted sum of deltas: sum_i w_i s_i B_i @ A_i = B_cat @ A_cat (scale 1).

    A_cat stacks the A_i along the rank axis (dim 0), B_cat the w_i s_i B_i (dim 1); a module a
    teacher does not adapt gets a zero block of that teacher's rank. Rank = sum_i r_i."""
    modules = list(dict.fromkeys(m for lo in loras for m in lo))
    ranks = [next(iter(lo.values()))[0].shape[0] for lo in loras]
    out = {}
    for m in modules:
        A_ref, B_ref = next(lo[m] for lo in loras if m in lo)
        As, Bs = [], []
        for lo, r, s, w in zip(loras, ranks, scales, weights):
            if m in lo:
                A, B = lo[m]
                As.append(A)
                Bs.append(B * (w * s))
            else:
                As.append(A_ref.new_zeros((r, *A_ref.shape[1:])))
                Bs.append(B_ref.new_zeros((B_ref.shape[0], r, *B_ref.shape[2:])))
        out[m] = (torch.cat(As, 0), torch.cat(Bs, 1))
    return out


def svd_lora(deltas: dict[str, Tensor], modules: list[str], rank: int) -> tuple[Lora, float]:
    """Best rank-`rank` LoRA (scale 1) of dense deltas on the given modules, by truncated SVD.
    Returns (lora, relative Frobenius residual over those modules). Used only to start a LoRA
    student from a dense cold start (full fine-tuned teachers); it is an approximation."""
    lora, res2, tot2 = {}, 0.0, 0.0
    for m in modules:
        d = deltas.get(f"{m}.weight")
        if d is None:
            continue
        M = d.double().flatten(1)  # (out, in*kh*kw)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = min(rank, S.numel())
        sq = S[:r].sqrt()
        A = (sq[:, None] * Vh[:r]).float()
        B = (U[:, :r] * sq[None]).float()
        if r < rank:  # pad to the common rank with zero blocks
            A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        A = A.view(rank, *d.shape[1:])
        B = B.view(d.shape[0], rank, *([1] * (d.ndim - 2)))
        lora[m] = (A, B)
        res2 += float((S[r:] ** 2).sum())
        tot2 += float((S**2).sum())
    return lora, math.sqrt(res2 / tot2) if tot2 > 0 else 0.0
