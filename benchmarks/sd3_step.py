"""Time one rollout + update step of the tiny SD3 model and measure memory with 1, 2 and 4 teachers.

One step is what the distillation stage does per iteration: the student (a trainable LoRA) samples
P prompts x G SDE trajectories with CFG (flowopd.rollout.rollout); then, on `--train-steps` of the
steps, each micro-batch is recomputed under the student (with gradients), under its routed teacher
(a frozen LoRA, no gradients) and under the anchor (the base, adapters off), and the OPD + MAR loss is
back-propagated into the student LoRA, followed by an AdamW step.

Every configuration runs in its own process (peak memory is a per-process high-water mark): peak
CUDA memory allocated on a GPU, peak resident set size (RSS) on the CPU (which includes Python and
the libraries: compare differences, not absolute numbers). Besides the measured peaks the report
gives the exact resident training state (transformer weights, adapters, gradients, AdamW state) per
configuration, hence the bytes each extra teacher adds against the frozen base, and the same
proportion for SD3.5-Medium's transformer shape (built on the meta device: no weights are loaded).

    python -m benchmarks.sd3_step                       # CPU, tiny model, 1/2/4 teachers
    python -m benchmarks.sd3_step --device cuda --dtype bf16 --resolution 64 --prompts 4 --group 8

Run from the repository root: the tiny model is the tests' (tests/sd3_tiny.py, not part of the
package). Writes benchmarks/results/sd3_step.json (or --out) and prints a summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json), used
# only to count parameters on the meta device.
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def lora_param_count(transformer, rank: int, targets) -> int:
    """Parameters of one LoRA of `rank` on the Linear layers peft would match with `targets`."""
    import torch

    n = 0
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (m.in_features + m.out_features)
    return n


def sd35m_estimate(rank: int = 32, config_path: str | None = None) -> dict:
    """LoRA size against SD3.5-M's transformer (the config above, or the model's own config.json)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from flowopd.backends.sd3 import LORA_TARGETS

    cfg = dict(SD35M_TRANSFORMER)
    if config_path:
        own = json.loads(Path(config_path).read_text())
        cfg = {k: own[k] for k in cfg if k in own}
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**cfg)
    base = sum(p.numel() for p in tr.parameters())
    lora = lora_param_count(tr, rank, LORA_TARGETS)
    return {"config": config_path or "built-in SD3.5-M shape (verify with --transformer-config)",
            "transformer_params": base, "lora_params_per_adapter": lora, "rank": rank,
            "lora_fp32_mb": round(lora * 4 / 2**20, 1), "transformer_bf16_mb": round(base * 2 / 2**20, 1),
            "lora_fp32_pct_of_bf16_transformer": round(100 * lora * 4 / (base * 2), 2),
            "lora_bf16_pct_of_bf16_transformer": round(100 * lora / base, 2)}


# ----------------------------------------------------------------------------- one configuration


def worker(args) -> dict:
    import torch

    from flowopd.losses import mar_loss, opd_direct_loss
    from flowopd.rollout import rollout, transition
    from tests.sd3_tiny import tiny_sd3_backend  # the tests' tiny SD3 (run from the repository root)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    dev = torch.device(args.device)
    b = tiny_sd3_backend(0, resolution=args.resolution, device=dev, dtype=args.dtype)
    base_bytes = sum(p.numel() * p.element_size() for m in (b.transformer, b.vae, *[
        t for t in (b.pipe.text_encoder, b.pipe.text_encoder_2, b.pipe.text_encoder_3) if t is not None])
        for p in m.parameters())
    transformer_bytes = sum(p.numel() * p.element_size() for p in b.transformer.parameters())
    teachers = [f"teacher{i}" for i in range(args.teachers)]
    for t in teachers:
        b.add_adapter(t, rank=args.rank, alpha=2 * args.rank, init=False, trainable=False)
    b.add_adapter("student", rank=args.rank, alpha=2 * args.rank)
    adapter_bytes = sum(p.numel() * p.element_size() for p in b._adapter_params["student"])
    params = b.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    prompts = [f'a sign that says "T{i}"' for i in range(args.prompts)]
    tasks = [teachers[i % len(teachers)] for i in range(args.prompts)]  # routing: prompt i -> teacher i mod k
    gen = torch.Generator().manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def one_step() -> tuple[float, float]:
        t0 = time.perf_counter()
        ro = rollout(b, prompts, tasks, args.group, steps=args.steps, cfg=args.cfg, noise_level=0.7, shift=3.0,
                     micro_batch=args.micro_batch, generator=gen)
        _sync(dev)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for j in ro.trainable_steps()[:args.train_steps]:
            for idx in ro.chunks():
                st = transition(b, ro, idx, j)
                teacher_mean = torch.empty_like(st.mean)
                with torch.no_grad():
                    for t in dict.fromkeys(ro.tasks[i] for i in idx.tolist()):
                        sel = torch.tensor([k for k, i in enumerate(idx.tolist()) if ro.tasks[i] == t])
                        with b.adapter(t):
                            teacher_mean[sel] = transition(b, ro, idx[sel], j).mean
                    with b.adapter(None):
                        anchor_mean = transition(b, ro, idx, j).mean
                loss = opd_direct_loss(st.mean, teacher_mean, st.std) + mar_loss(st.mean, anchor_mean, st.std, 0.02)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1

    one_step()  # warm-up (allocator, lazy inits), not timed
    times = [one_step() for _ in range(args.repeats)]
    tensors = {id(t): t for t in b.transformer.parameters()}  # resident training state, each tensor once
    tensors.update({id(p.grad): p.grad for p in params if p.grad is not None})
    tensors.update({id(v): v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)})
    state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rec = {"teachers": args.teachers, "transformer_state_bytes": state_bytes,
           "rollout_s": min(t[0] for t in times), "update_s": min(t[1] for t in times),
           "step_s": min(t[0] + t[1] for t in times), "base_model_bytes": base_bytes,
           "transformer_bytes": transformer_bytes, "adapter_bytes": adapter_bytes,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        rec["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- driver


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    ap.add_argument("--steps", type=int, default=4, help="SDE steps of a rollout")
    ap.add_argument("--train-steps", type=int, default=2, help="steps trained per rollout")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default; 1 is fastest for the tiny model)")
    ap.add_argument("--transformer-config", default=None,
                    help="SD3.5-M transformer/config.json for the size estimate (default: the built-in shape)")
    ap.add_argument("--out", default=str(HERE / "results" / "sd3_step.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # one configuration; the driver reads the last line
        args.teachers = args.teachers[0]
        print(json.dumps(worker(args)))
        return

    runs = []
    for k in args.teachers:
        cmd = [sys.executable, "-m", "benchmarks.sd3_step", "--worker", "--teachers", str(k)] + [
            a for kv in (("--prompts", args.prompts), ("--group", args.group), ("--steps", args.steps),
                         ("--train-steps", args.train_steps), ("--micro-batch", args.micro_batch),
                         ("--cfg", args.cfg), ("--rank", args.rank), ("--resolution", args.resolution),
                         ("--device", args.device), ("--dtype", args.dtype), ("--repeats", args.repeats),
                         ("--threads", args.threads)) for a in (kv[0], str(kv[1]))]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
        if res.returncode:
            sys.stderr.write(res.stderr[-4000:])
            raise SystemExit(f"worker with {k} teachers failed ({res.returncode})")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{k} teacher(s): step {runs[-1]['step_s']:.2f} s", file=sys.stderr)

    first, last = runs[0], runs[-1]
    key = "peak_cuda_mb" if "peak_cuda_mb" in first else "peak_rss_mb"
    span = last["teachers"] - first["teachers"]
    per_teacher = (last[key] - first[key]) / span if span else 0.0
    state_per_teacher = (last["transformer_state_bytes"] - first["transformer_state_bytes"]) / span if span else 0
    summary = {
        "peak_key": key,
        "peak_mb_per_extra_teacher": round(per_teacher, 3),
        "peak_per_extra_teacher_pct_of_1_teacher_peak": round(100 * per_teacher / first[key], 3),
        "state_mb_per_extra_teacher": round(state_per_teacher / 2**20, 3),
        "state_per_extra_teacher_pct_of_base_transformer": round(100 * state_per_teacher / first["transformer_bytes"], 2),
        "state_per_extra_teacher_pct_of_base_model": round(100 * state_per_teacher / first["base_model_bytes"], 2),
    }
    report = {
        "what": "one rollout + OPD/MAR update step of the tiny SD3 model (tests/sd3_tiny.py: tiny_sd3_backend)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "teachers", "transformer_config")},
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "runs": runs, "summary": summary, "sd35m_transformer_estimate": sd35m_estimate(args.rank, args.transformer_config),
        "note": ("transformer_state_bytes = transformer weights + adapters + gradients + AdamW state (exact); "
                 "peak_rss_mb includes the interpreter and libraries and is coarse on the CPU (peak_cuda_mb on a GPU "
                 "is exact); timings on a shared CPU are noisy. The tiny model's adapter is large next to its tiny "
                 "base: read sd35m_transformer_estimate for the real proportion."),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'teachers':>8} {'rollout s':>10} {'update s':>9} {'step s':>7} {key:>13}")
    for r in runs:
        print(f"{r['teachers']:>8} {r['rollout_s']:>10.3f} {r['update_s']:>9.3f} {r['step_s']:>7.3f} {r[key]:>13.1f}")
    print(json.dumps(summary, indent=2))
    print(json.dumps(report["sd35m_transformer_estimate"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
