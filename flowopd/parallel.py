"""Data parallelism for the trainers: one process, or several under `accelerate launch` / `torchrun`.

The trainers (GRPO, OPD) run the same loop on every process and talk to the others only through
`Dist`. With one process (no launcher, or WORLD_SIZE=1) every method is the identity and nothing
is imported: the toy default runs as it always has, without accelerate. Under a launcher,
`Dist.create` asks accelerate's `PartialState` to join the process group (NCCL on GPUs, gloo on
CPUs) and the trainers do this:

  - prompts: every process draws the same global batch of P prompts (same seed, same random
    calls) and keeps groups r, r + W, r + 2W, ... (rank r of W processes; `mine`);
  - noise: with `noise: per_group` (automatic with several processes) a group's initial and SDE
    noise comes from its own generator seeded by (seed, iteration, global group index)
    (`group_noise`), so a sample's noise does not depend on which process draws it, and every
    process draws different noise because it holds different groups;
  - rewards: each process scores its own samples; `gather` concatenates them (and the group ids,
    tasks, stats) in rank order, so advantages (group means, the batch std) are computed over the
    global batch, identically on every process, and `local` takes this process's rows back;
  - gradients: `average_gradients` all-reduces the trainable parameters' gradients (mean over
    processes) before clipping and the optimizer step, which then runs identically everywhere
    (the trainable parameters are broadcast from rank 0 at the start); this is what DDP does,
    done by hand because the trainers switch LoRA adapters (teachers, anchor) inside one step;
  - output: logs, checkpoints and summaries are written by rank 0 only (`is_main`).

With equal numbers of samples per process (P divisible by W; `check_batch`), one process with the
whole batch and W processes with a share each compute the same update up to float rounding:
tests/test_distributed.py checks that on two CPU processes.

FSDP and DeepSpeed launch configs start the processes and this data parallelism runs as with
DDP; their sharding of the frozen base is not applied (see `Dist.create`).
"""
from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import torch
import torch.distributed as td

from .config import ConfigError
from .errors import UserError


def launched_world_size() -> int:
    """Processes started by a launcher (accelerate launch, torchrun): the WORLD_SIZE variable."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Dist:
    """This process's place among the training processes (see the module doc)."""

    def __init__(self, world: int = 1, rank: int = 0, device: str | torch.device = "cpu", state=None):
        self.world, self.rank = int(world), int(rank)
        self.device = torch.device(device)
        self._state = state  # accelerate's PartialState when launched, else None

    @classmethod
    def create(cls, device: str = "cpu") -> "Dist":
        """One process (nothing imported) unless a launcher set WORLD_SIZE > 1; then join the process
        group through accelerate. device "cpu" keeps every process on the CPU (gloo); "cuda" gives
        each process its own GPU (cuda:LOCAL_RANK, NCCL)."""
        if launched_world_size() <= 1:
            return cls(1, 0, device)
        try:
            from accelerate import PartialState  # optional (flowopd[sd3]): only under a launcher
        except ImportError:
            raise UserError("training on several processes needs accelerate: pip install 'flowopd[sd3]'") from None
        cpu = str(device) == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        kind = str(state.distributed_type).split(".")[-1]
        if kind in ("FSDP", "DEEPSPEED") and state.is_main_process:
            warnings.warn(f"launched with a {kind} config: flowopd trains its LoRA adapters by data parallelism "
                          "(gradients all-reduced, as DDP); the frozen base is replicated on every process, "
                          f"not sharded by {kind}", stacklevel=2)
        dev = torch.device("cpu") if cpu else state.device
        return cls(state.num_processes, state.process_index, dev, state)

    # ---- who am I --------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def check_batch(self, prompts_per_step: int) -> None:
        """Every process must hold the same number of prompts (equal shares keep the update exact)."""
        if prompts_per_step % self.world:
            raise ConfigError(f"prompts_per_step ({prompts_per_step}) must be divisible by the number of "
                              f"processes ({self.world})")

    def local_accum(self, grad_accum: int) -> int:
        """Micro-batches one process accumulates per optimizer step, for `grad_accum` micro-batches
        over all processes (config batch keys are global numbers)."""
        return max(1, grad_accum // self.world)

    def mine(self, n: int) -> list[int]:
        """This process's share of n groups: r, r + W, r + 2W, ..."""
        return list(range(self.rank, n, self.world))

    # ---- collectives -------------------------------------------------------------------------------
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a (b, ...) tensor of every process along dim 0, in rank order (equal b)."""
        if not self.active:
            return t
        x = t.detach().to(self._comm_device()).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        td.all_gather(parts, x)
        return torch.cat(parts).to(t.device)

    def local(self, t_all: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor `gather` built (equal shares)."""
        if not self.active:
            return t_all
        n = t_all.shape[0] // self.world
        return t_all[self.rank * n:(self.rank + 1) * n]

    def gather_list(self, items: list) -> list:
        """Concatenate a list of picklable items of every process, in rank order."""
        if not self.active:
            return list(items)
        out = [None] * self.world
        td.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (e.g. a time limit reached)."""
        if not self.active:
            return bool(flag)
        x = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        td.all_reduce(x, op=td.ReduceOp.MAX)
        return bool(x.item() > 0)

    def average_gradients(self, params) -> None:
        """Mean of every parameter's gradient over the processes (missing gradients count as 0)."""
        if not self.active:
            return
        params = list(params)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                          for p in params]).to(self._comm_device())
        td.all_reduce(flat)
        flat /= self.world
        i = 0
        for p in params:
            n = p.numel()
            g = flat[i:i + n].view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
            i += n

    def broadcast_parameters(self, params) -> None:
        """Copy rank 0's values of `params` to every process (identical starting weights)."""
        if not self.active:
            return
        with torch.no_grad():
            for p in params:
                x = p.detach().to(self._comm_device()).contiguous()
                td.broadcast(x, src=0)
                p.copy_(x.to(p.device))

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def close(self) -> None:
        """Leave the process group (at the end of a launched run)."""
        if self.active:
            if td.is_initialized():
                td.barrier()
                td.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return torch.device("cpu") if td.get_backend() == "gloo" else self.device


def param_checksum(params) -> str:
    """First 16 hex digits of the sha256 of the parameters' float32 bytes: two processes print the
    same checksum iff their weights are bitwise equal (the trainers record one per process)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- noise


def group_seed(seed: int, step: int, group: int) -> int:
    """A 63-bit generator seed for (run seed, iteration, global group index), well mixed."""
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF, int(group) & 0xFFFFFFFF])
    return int(s.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


def group_noise(seed: int, step: int, groups: list[int], group_size: int, num_steps: int,
                shape: tuple[int, ...]) -> torch.Tensor:
    """All the noise of a rollout, drawn per group: (len(groups) * G, N + 1, *shape) float32 on the
    CPU; [:, 0] the initial noise, [:, j + 1] the SDE noise of step j. Group g's block comes from a
    generator seeded by group_seed(seed, step, g), whichever process draws it."""
    out = []
    for g in groups:
        gen = torch.Generator().manual_seed(group_seed(seed, step, g))
        out.append(torch.randn((group_size, num_steps + 1, *shape), generator=gen))
    return torch.cat(out) if out else torch.zeros((0, num_steps + 1, *shape))


def noise_mode(setting: str, stream_noise: bool, device, world: int) -> str:
    """"stream" (one CPU generator for the whole run: the toy trainers' original draw) or
    "per_group" (group_noise). "auto": stream only for a back end whose `stream_noise` is set (the
    tiny one) on one CPU process, so that toy runs reproduce what they always gave; per_group
    everywhere else (several processes
    need it; it also draws on the CPU, so that GPU rollouts work with CPU generators)."""
    if setting != "auto":
        return setting
    if stream_noise and world == 1 and torch.device(device).type == "cpu":
        return "stream"
    return "per_group"
