"""The `flowopd` command line.

Every subcommand turns bad input into one message on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import __version__
from .backends import load_checkpoint
from .config import load, parse_overrides
from .errors import UserError
from .evaluate import evaluate
from .io import read_manifest, read_prompt_file, staged_dir, write_images
from .pipeline import main_run
from .report import HEADER, table_rows
from .sampling import sample_images
from .trainers.checkpointing import has_state
from .trainers.coldstart import main_coldstart
from .trainers.grpo import main_grpo
from .trainers.opd import main_distill
from .trainers.pretrain import PretrainConfig, pretrain
from .world.scoring import score_images

DESCRIPTION = """\
flowopd: multi-task alignment of flow-matching text-to-image models by
on-policy distillation (Flow-OPD). The toy world (32x32 images, CPU) is the
default back end; CKPT 'base' names the base model shipped with the package.
"""


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or auto")
    return name


def _check_sampling_args(args) -> None:
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.cfg is not None and args.cfg < 0:
        raise UserError("--cfg must be >= 0")


def cmd_sample(args) -> int:
    _check_sampling_args(args)
    records = read_prompt_file(args.prompts)
    backend = load_checkpoint(args.checkpoint, _device(args.device))
    images = sample_images(backend, [r["prompt"] for r in records], steps=args.steps, cfg=args.cfg,
                           seed=args.seed, batch_size=args.batch_size)
    with staged_dir(args.out) as tmp:
        write_images(tmp, images, records)
    print(f"wrote {len(images)} images and manifest.jsonl to {args.out}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    _check_sampling_args(args)
    if args.split not in ("test", "train"):
        raise UserError(f"unknown split {args.split!r}; use test or train")
    backend = load_checkpoint(args.checkpoint, _device(args.device))
    metrics, images, prompts, scores = evaluate(backend, args.split, args.steps, args.cfg, args.seed)
    metrics["checkpoint"] = str(args.checkpoint)
    out = Path(args.out or f"runs/eval-{Path(str(args.checkpoint)).name}")
    with staged_dir(out) as tmp:
        write_images(tmp, images, [{"prompt": p.text, "task": p.task, "score": round(sc, 6)}
                                   for p, sc in zip(prompts, scores)])
        (tmp / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    se = metrics["se"]
    summary = ", ".join(f"{k} {metrics[k]:.3f} ± {se[k]:.3f}" for k in ("compose", "text", "quality", "average")
                        if metrics.get(k) is not None and se.get(k) is not None)
    print(f"{summary}, FD {metrics['fidelity']:.2f} (mean ± standard error)", file=sys.stderr)
    lengths = sorted(k for k in metrics if k.startswith("text_len") and metrics[k] is not None)
    if lengths:
        print("text by sign length: " + ", ".join(f"{k[len('text_len'):]} {metrics[k]:.3f}" for k in lengths),
              file=sys.stderr)
    print(f"wrote {out}/eval.json and the {len(images)} images", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    images, prompts = read_manifest(args.dir)
    print(json.dumps(score_images(images, prompts)))
    return 0


def cmd_pretrain(args) -> int:
    cfg = load(PretrainConfig, args.config, args.overrides)
    given = parse_overrides(args.overrides)
    cfg.stages = [{k: v for k, v in st.items() if k not in given} for st in cfg.stages]  # the command line wins
    _device(cfg.device)
    _check_resume(args)
    final = pretrain(cfg, args.out, overwrite=args.overwrite)
    print(f"final EMA weights: {final}", file=sys.stderr)
    return 0


def _model_overrides(args) -> list[str]:
    """--model PATH is the `model=PATH` config key (the SD3 pipeline of backend: sd3)."""
    return list(args.overrides) + ([f"model={args.model}"] if args.model else [])


def _rank0() -> bool:
    """Not a secondary process of an `accelerate launch` / `torchrun` run."""
    return os.environ.get("RANK", "0") == "0"


def _check_resume(args) -> None:
    """--resume needs an intact state in OUT/state (the trainers check it for their own runs too)."""
    if getattr(args, "resume", False):
        if not has_state(Path(args.out) / "state"):
            raise UserError(f"--resume: no complete checkpoint in {Path(args.out) / 'state'}")


def _train(main_fn, args) -> int:
    """grpo and distill: run the trainer on --config/--model/--out, name its final checkpoint (rank 0)."""
    final = main_fn(args.config, args.out, _model_overrides(args), overwrite=args.overwrite, resume=args.resume)
    if _rank0():
        print(f"final checkpoint: {final}", file=sys.stderr)
    return 0


def cmd_grpo(args) -> int:
    return _train(main_grpo, args)


def cmd_coldstart(args) -> int:
    final = main_coldstart(args.method, args.teachers, args.out, args.overrides, overwrite=args.overwrite,
                           resume=args.resume)
    print(f"cold-start checkpoint: {final}", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    return _train(main_distill, args)


def cmd_run(args) -> int:
    res = main_run(args.preset, args.out, args.config, args.overrides)
    rows = table_rows(res)
    print(" | ".join(HEADER[:6]))
    for r in rows:
        print(" | ".join(r[:6]))
    return 0


def _sampling_flags(sp) -> None:
    sp.add_argument("--steps", type=int, default=None, help="ODE steps (default: the checkpoint's, 40)")
    sp.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the checkpoint's)")
    sp.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sp.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def _resume_flags(sp) -> None:
    sp.add_argument("--resume", action="store_true",
                    help="continue from the last complete checkpoint in OUT/state (an error if there is "
                         "none); rerunning the same command on the same --out resumes too")
    sp.add_argument("--overwrite", action="store_true",
                    help="allow an --out that holds another run's config (its states and log are removed)")


def _trainer(sub, name: str, func, help: str, description: str, example: str, *, model: bool = False,
             config_help: str = "YAML config", out_help: str = "output directory; rerunning on the same --out resumes"):
    """A training subcommand: --config, [--model], --out, --resume/--overwrite, key=value overrides."""
    sp = sub.add_parser(name, help=help, description=description)
    sp.add_argument("--config", default=None, help=config_help)
    if model:
        sp.add_argument("--model", default=None, help="the model key: an SD3 pipeline directory or hub id (backend: sd3)")
    sp.add_argument("--out", required=True, help=out_help)
    _resume_flags(sp)
    sp.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    sp.set_defaults(func=func)
    return sp


def _world_commands(sub) -> None:
    """sample, eval, score: the toy world's images and scores."""
    sp = sub.add_parser("sample", help="sample one 32x32 PNG per prompt, plus manifest.jsonl",
                        description="Sample one image per prompt with the ODE sampler and write DIR/0000.png ... "
                                    "and DIR/manifest.jsonl ({prompt, task, file} per line).")
    sp.add_argument("--checkpoint", required=True, help="checkpoint directory, or 'base' for the shipped base")
    sp.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL ({prompt, task})")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    _sampling_flags(sp)
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("eval", help="evaluate a checkpoint on a split: compose, text, quality, fidelity",
                        description="Sample the split's prompts with the default sampler, score them, print the "
                                    "metrics as JSON (compose per category, text per sign length, each mean "
                                    "with its standard error) and write OUT/eval.json with the images and "
                                    "manifest.jsonl, which holds each image's score.")
    sp.add_argument("--checkpoint", required=True, help="checkpoint directory, or 'base'")
    sp.add_argument("--split", default="test", help="test (default) or train")
    sp.add_argument("--out", default=None, help="output directory (default runs/eval-<checkpoint name>)")
    _sampling_flags(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("score", help="score the images of DIR/manifest.jsonl with the world's scorers",
                        description="Score any folder with a manifest.jsonl ({prompt, task, file} per line) and "
                                    "print one JSON object: compose, one key per compose category, text, quality, n.")
    sp.add_argument("dir", help="folder holding manifest.jsonl and the images")
    sp.set_defaults(func=cmd_score)


def _training_commands(sub) -> None:
    """pretrain, grpo, coldstart, distill: the method's stages."""
    _trainer(sub, "pretrain", cmd_pretrain, "pretrain the tiny base model on the toy world (flow matching)",
             "Train the tiny model from scratch with the flow-matching loss; "
             "configs/toy_pretrain.yaml is the recipe of the shipped base.", "steps=1000",
             config_help="YAML config (default: built-in defaults)",
             out_help="output directory for checkpoints and logs; rerunning on the same --out resumes from its last state")
    _trainer(sub, "grpo", cmd_grpo, "Flow-GRPO: train a teacher (one reward) or GRPO-Mix (all rewards)",
             "Fine-tune the base with Flow-GRPO (LoRA by default). Checkpoints, logs (train_log.jsonl, tensorboard) "
             "and the resolved config go to --out; OUT/final is the trained model. `objective: nft` swaps the "
             "clipped-ratio update for DiffusionNFT's forward-process loss. Examples: configs/toy_grpo_compose.yaml, "
             "toy_grpo_compose_nft.yaml, toy_grpo_text.yaml, toy_grpo_quality.yaml, toy_grpo_mix.yaml; on SD3.5: "
             "configs/sd35m_grpo_{ocr,geneval,pickscore}.yaml with --model. Runs on several GPUs under "
             "`accelerate launch -m flowopd grpo ...`.", "--steps=10", model=True)
    sp = sub.add_parser("coldstart", help="cold start for the student: merge teacher deltas, or SFT on their best samples",
                        description="merge: the exact (weighted) average of the teachers' weight deltas (for LoRA, "
                                    "of B @ A). sft: flow-matching fine-tune of the base on each teacher's best "
                                    "samples of its own task. Writes a checkpoint directory to --out. (Toy checkpoints; with "
                                    "backend: sd3 the cold start runs inside `distill`, init: merge|sft.)")
    sp.add_argument("--method", required=True, choices=["merge", "sft"], help="merge or sft")
    sp.add_argument("--teachers", required=True, nargs="+", metavar="DIR",
                    help="teacher checkpoints or GRPO run folders (TASK=DIR to name the task)")
    sp.add_argument("--out", required=True, help="output checkpoint directory; rerunning on the same --out "
                                                  "resumes an interrupted sft")
    _resume_flags(sp)
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. --weights=[0.5,0.25,0.25]")
    sp.set_defaults(func=cmd_coldstart)
    _trainer(sub, "distill", cmd_distill, "Flow-OPD: on-policy distillation of the teachers into one student, with MAR",
             "The student samples SDE trajectories for prompts of all tasks; each is routed to a teacher "
             "(routing=task|reward|soft) that supervises every step (rule=direct|pg, or the Flow-OPD authors' "
             "kl_only|mixed|task_only), plus beta * KL to the anchor (MAR). Examples: configs/toy_opd_merge.yaml; "
             "on SD3.5: configs/sd35m_opd.yaml with --model (the authors' kl_only recipe, docs/sd35.md).",
             "--beta=0 teachers.text=DIR", model=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowopd", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"flowopd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _world_commands(sub)
    _training_commands(sub)
    sp = sub.add_parser("run", help="the whole toy pipeline: teachers, GRPO-Mix, cold starts, OPD, eval, report",
                        description="Run every stage in order, each cached in --out: a second run skips what is "
                                    "done and a stopped run resumes at the stage it was in. Writes results.json, "
                                    "report.md, report.html and checkpoints/<model>/.")
    sp.add_argument("--preset", default="full", help="quick (smoke run, minutes) or full (the real result; default)")
    sp.add_argument("--out", default="runs/pipeline", help="output directory (default runs/pipeline)")
    sp.add_argument("--config", default=None, help="YAML with extra per-stage overrides and the base to start from (see flowopd.pipeline.RunConfig)")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra:
        if hasattr(args, "overrides"):
            args.overrides = list(args.overrides) + [e for e in extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"flowopd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
