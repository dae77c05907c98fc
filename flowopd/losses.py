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


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, *,
              detach_advantages: bool = True):
    """PPO-clipped policy loss:  mean(max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e))),
    ratio = exp(log_prob - old_log_prob).

    log_prob, old_log_prob: (B,) or (B, K); advantages: same shape, or (B,) (broadcast over steps);
    advantages are detached unless detach_advantages=False (the Flow-OPD authors' reward modes,
    whose KL advantage keeps its graph). Returns (loss, stats), stats a dict of detached 0-d tensors:
    clip_frac = fraction with |ratio - 1| > e, ratio_mean / ratio_min / ratio_max, and
    approx_kl = 0.5 * mean((log_prob - old_log_prob)^2).
    """
    adv = advantages.detach() if detach_advantages else advantages
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


def nft_weights(advantages: Tensor, scale: float = 1.0, negatives: bool = True) -> Tensor:
    """Optimality weights of the forward-process objective: r = 0.5 + 0.5 * clip(A / scale, -1, 1),
    in [0, 1]; r = 0.5 (no push either way) for a sample as good as its group. negatives=False
    floors r at 0.5: only the samples that beat their group are learned from. (B,)"""
    r = 0.5 + 0.5 * (advantages.detach().float() / scale).clamp(-1.0, 1.0)
    return r if negatives else r.clamp(min=0.5)


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


# ----------------------------------------------------------------------------- the Flow-OPD authors' modes

REWARD_MODES = ("kl_only", "mixed", "task_only")
KL_NORMS = ("none", "per_sample", "per_timestep", "global")


def authors_kl_norm(x: Tensor, mode: str) -> Tensor:
    """The Flow-OPD authors' `kl_norm` (CostaliyA/Flow-OPD scripts/train_sd3_opd_mix.py): "none"
    leaves x as it is; "per_sample", "per_timestep" and "global" all compute the same thing there,
    (x - mean) / (std + 1e-4) over the micro-batch's values at one step (torch's unbiased std),
    gradients flowing through mean and std. (b,)"""
    if mode == "none":
        return x
    if mode not in KL_NORMS:
        raise ValueError(f"unknown kl_norm {mode!r}, expected one of {KL_NORMS}")
    return (x - x.mean()) / (x.std() + 1e-4)


def reward_mode_loss(mode: str, kl: Tensor, log_prob: Tensor, old_log_prob: Tensor, task_adv: Tensor | None, *,
                     kl_scale: float = -1.0, kl_norm: str = "none", adv_clip: float = 5.0,
                     clip_range: float = 1e-4, keep: Tensor | None = None):
    """One step of the Flow-OPD authors' OPD objective (their `train.reward_mode`) for a micro-batch.

        kl_only:   A = clip(kl_scale * norm(KL), +-adv_clip)
        mixed:     A = clip(clip(norm(A_task), +-adv_clip) + kl_scale * norm(KL), +-adv_clip)
        task_only: A = clip(A_task, +-adv_clip)
        loss = mean(max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e)))

    kl: (b,) per-step KL(student || teacher) WITH its graph: the authors do not detach it, so the
    surrogate's gradient is kl_scale * grad KL * ratio (the direct rule, for kl_scale = -1) plus
    the score-function term A * grad ratio. task_adv: (b,) group advantages of the task reward
    (mixed, task_only). keep: (b,) bool, the samples kept (their zero-advantage drop); a
    micro-batch with none kept gives a zero loss. -> (loss, stats) as grpo_loss."""
    if mode not in REWARD_MODES:
        raise ValueError(f"unknown reward mode {mode!r}, expected one of {REWARD_MODES}")
    if mode == "kl_only":
        adv = (kl_scale * authors_kl_norm(kl, kl_norm)).clamp(-adv_clip, adv_clip)
    elif mode == "mixed":
        task = authors_kl_norm(task_adv, kl_norm).clamp(-adv_clip, adv_clip)
        adv = (task + kl_scale * authors_kl_norm(kl, kl_norm)).clamp(-adv_clip, adv_clip)
    else:
        adv = task_adv.clamp(-adv_clip, adv_clip)
    if keep is not None:
        if not bool(keep.any()):
            return log_prob.sum() * 0.0, {}
        log_prob, old_log_prob, adv = log_prob[keep], old_log_prob[keep], adv[keep]
    return grpo_loss(log_prob, old_log_prob, adv, clip_range, detach_advantages=False)


def advantage_groups(mode: str, group_ids, prompts):
    """The groups of GRPO's advantages: "draw" = the G samples of one prompt draw (group_ids);
    "prompt" = every sample of the same prompt text in the batch (Flow-GRPO's
    per_prompt_stat_tracking = True: PerPromptStatTracker pools a prompt drawn twice); "none" = the
    whole batch is one group (per_prompt_stat_tracking = False: (r - mean_batch) / (std + 1e-4))."""
    if mode == "draw":
        return group_ids
    if mode == "prompt":
        return list(prompts)
    if mode == "none":
        return torch.zeros(len(prompts), dtype=torch.long)
    raise ValueError(f"unknown adv_groups {mode!r}, expected draw, prompt or none")


def _rewards_by_group(rewards: Tensor, groups) -> tuple[list, dict]:
    """(each sample's group key, {key: [its rewards in batch order]})."""
    keys = groups.tolist() if torch.is_tensor(groups) else list(groups)
    by: dict = {}
    for k, r in zip(keys, rewards.tolist()):
        by.setdefault(k, []).append(r)
    return keys, by


def zero_std_groups(rewards: Tensor, groups) -> Tensor:
    """(B,) bool: the sample's group has rewards all equal (zero std), so its group advantage is 0
    and carries no signal (the samples the Flow-OPD authors drop from the update)."""
    keys, by = _rewards_by_group(rewards, groups)
    same = {k: all(x == v[0] for x in v) for k, v in by.items()}
    return torch.tensor([same[k] for k in keys], dtype=torch.bool)


def group_reward_stats(rewards: Tensor, groups) -> dict:
    """{"zero_std_ratio": share of groups whose rewards are all equal (no learning signal),
    "reward_std_mean": mean over groups of the rewards' population std}, as Flow-GRPO's
    calculate_zero_std_ratio logs them."""
    _, by = _rewards_by_group(rewards, groups)
    stds = [torch.tensor(v, dtype=torch.float64).std(unbiased=False).item() for v in by.values()]
    zero = [all(x == v[0] for x in v) for v in by.values()]
    return {"zero_std_ratio": sum(zero) / max(1, len(zero)), "reward_std_mean": sum(stds) / max(1, len(stds))}
