"""Losses: flow matching, group advantages, GRPO, on-policy distillation (OPD) and MAR.

Pure functions of tensors and numbers. Shapes: B samples; per-step quantities are (B,) for one
step or (B, K) for K steps; states and means are (B, ...).
"""

import torch
from torch import Tensor

from flowopd.flow import step_kl, velocity_target


def flow_matching_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """mean((v_pred - (noise - x0))^2) over every element, in float32. Scalar."""
    return ((v_pred.float() - velocity_target(x0, noise).float()) ** 2).mean()


def logit_normal_sigmas(batch: int, mean: float = 0.0, std: float = 1.0,
                        generator: torch.Generator = None, device=None) -> Tensor:
    """Training noise levels sigma = sigmoid(mean + std * z), z ~ N(0, 1) (SD3's logit-normal). (B,)"""
    z = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(mean + std * z)


def group_advantages(rewards: Tensor, group_ids, std_scope: str = "batch",
                     eps: float = 1e-4, clip: float = 5.0) -> Tensor:
    """GRPO advantages (Flow-GRPO):  A = clip((r - mean_group) / (std + eps), -clip, clip).   (B,)

    rewards: (B,); group_ids: (B,) tensor, or a sequence of hashables (e.g. prompts) naming each
    sample's group. std is the population std (ddof=0) of the whole batch (std_scope="batch",
    Flow-GRPO's default) or of the sample's own group (std_scope="group"). clip=None: no clipping.
    """
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    if not torch.is_tensor(group_ids):
        index = {}
        group_ids = torch.tensor([index.setdefault(g, len(index)) for g in group_ids])
    _, inv = torch.unique(group_ids.to(r.device), return_inverse=True)  # (B,) group index
    num_groups = int(inv.max()) + 1
    count = r.new_zeros(num_groups).index_add_(0, inv, torch.ones_like(r))  # (G,)
    mean = r.new_zeros(num_groups).index_add_(0, inv, r) / count  # (G,)
    centered = r - mean[inv]  # (B,)
    if std_scope == "batch":
        std = r.std(unbiased=False)
    elif std_scope == "group":
        std = (r.new_zeros(num_groups).index_add_(0, inv, centered**2) / count).sqrt()[inv]
    else:
        raise ValueError(f"unknown std_scope {std_scope!r}, expected 'batch' or 'group'")
    adv = centered / (std + eps)
    return adv if clip is None else adv.clamp(-clip, clip)


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float):
    """PPO-clipped policy loss:  mean(max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e))),
    ratio = exp(log_prob - old_log_prob).

    log_prob, old_log_prob: (B,) or (B, K); advantages: same shape, or (B,) (broadcast over steps);
    advantages are detached. Returns (loss, stats), stats a dict of detached 0-d tensors:
    clip_frac = fraction with |ratio - 1| > e, ratio_mean / ratio_min / ratio_max, and
    approx_kl = 0.5 * mean((log_prob - old_log_prob)^2).
    """
    adv = advantages.detach()
    adv = adv.view(*adv.shape, *([1] * (log_prob.ndim - adv.ndim)))  # (B, 1) against (B, K)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": ((ratio - 1).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


def nft_weights(advantages: Tensor, scale: float = 1.0) -> Tensor:
    """Optimality weights of the forward-process objective: r = 0.5 + 0.5 * clip(A / scale, -1, 1),
    in [0, 1]; r = 0.5 (no push either way) for a sample as good as its group. (B,)"""
    return 0.5 + 0.5 * (advantages.detach().float() / scale).clamp(-1.0, 1.0)


def nft_loss(v: Tensor, v_old: Tensor, target: Tensor, r: Tensor, beta: float = 1.0):
    """Forward-process (negative-aware) policy loss on noised final samples (DiffusionNFT,
    arXiv 2509.16117), for `objective: nft` of the GRPO trainer.

        v_pos = (1 - beta) v_old + beta v        (the implicit improved policy)
        v_neg = (1 + beta) v_old - beta v        (its reflection, the implicit worse policy)
        loss  = mean_B [ r * mean_dims (v_pos - target)^2 + (1 - r) * mean_dims (v_neg - target)^2 ]

    v: (B, ...) velocity of the trained policy at x_t = (1 - t) x0 + t noise; v_old: the same under
    the policy that sampled x0 (detached); target = noise - x0; r: (B,) weights in [0, 1]
    (nft_weights). At v == v_old the gradient w.r.t. v is 2 beta (2r - 1)(v_old - target) / D per
    sample: r = 1 is beta times the flow-matching gradient toward the sample, r = 0 pushes away from
    it, r = 0.5 gives none; the loss is bounded below for every r. Returns (loss, stats).
    """
    v_old, target = v_old.detach().float(), target.detach().float()
    v = v.float()
    dims = tuple(range(1, v.ndim))
    pos = (((1 - beta) * v_old + beta * v - target) ** 2).mean(dims)  # (B,)
    neg = (((1 + beta) * v_old - beta * v - target) ** 2).mean(dims)  # (B,)
    r = r.detach().float().to(v.device)
    loss = (r * pos + (1 - r) * neg).mean()
    with torch.no_grad():
        stats = {"fm_mse": ((v - target) ** 2).mean(), "v_shift": ((v - v_old) ** 2).mean()}
    return loss, stats


def opd_direct_loss(mean_student: Tensor, mean_teacher: Tensor, step_std, *,
                    dt=None, normalization: str = "exact") -> Tensor:
    """Direct OPD: mean over the batch of the per-step KL(student || teacher) (see flow.step_kl for
    the normalisations). The gradient flows through the student's mean; the teacher is detached.
    mean_*: (B, ...) transition means from the same state; step_std: SDEStep.std. Scalar."""
    return step_kl(mean_student, mean_teacher.detach(), step_std, dt=dt, normalization=normalization).mean()


def opd_pg_advantages(kl: Tensor) -> Tensor:
    """Policy-gradient OPD: per-step advantage A_k = -KL_k, detached. Same shape as kl ((B,) or (B, K))."""
    return -kl.detach()


def mar_loss(mean_student: Tensor, mean_anchor: Tensor, step_std, beta: float, *,
             dt=None, normalization: str = "exact") -> Tensor:
    """Manifold Anchor Regularization: beta * mean per-step KL(student || frozen anchor). Scalar."""
    return beta * opd_direct_loss(mean_student, mean_anchor, step_std, dt=dt, normalization=normalization)
