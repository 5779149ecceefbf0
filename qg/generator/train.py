"""Training a generator: one readable loop, AdamW + cosine, resumable, data-parallel under torchrun.

Determinism: every step draws its batch (and the diffusion head's noise) from a generator seeded by
(seed, step), so a run interrupted and resumed from its last checkpoint ends with exactly the
weights of an uninterrupted run, and K data-parallel processes see the same global batches as one
process (each takes every K-th sample of it).

    torchrun --nproc_per_node=2 -m qg.generator.train --data DIR --out DIR [--steps N ...]

runs the same loop data-parallel (gloo on CPU, nccl on CUDA) with no code change. Across machines,
the same command on each, with a rendezvous (HOST: the first machine; --out on a filesystem all of
them see, since every process reads the checkpoint it resumes from):

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m qg.generator.train --data DIR --out DIR [--config JSON ...]

`train: {strategy: fsdp}` (in `--config` or the profile) shards parameters, gradients and AdamW
state over the processes (FSDP2) instead of DDP's full copy per process: for a generator whose
parameters + AdamW state do not fit one device. It is launched by torchrun exactly as DDP; its
checkpoints hold full tensors, so a run resumes under either strategy or in one process.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..core.io import atomic_write, read_json
from .directory import QuantGen
from .memory import peak_memory_mb, saved_activation_mb
from .model import Generator, GeneratorConfig
from .pairs import TokenPairs
from .parallel import (
    STRATEGIES,
    bytes_per_rank,
    gather_into,
    load_full_state,
    read_checkpoint,
    unwrapped,
    wrap,
    write_checkpoint,
)
from .tokenizer import Tokenizer


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    mask_padding: bool = True
    ckpt_every: int = 100
    # `qg.generator.loss.loss_weights`: the paper's plain MSE, or per segment (ours)
    loss_weighting: str = "element"
    # under torchrun: one of STRATEGIES (no effect in one process; not part of a run's identity)
    strategy: str = "ddp"
    # recompute each block's activations in the backward pass instead of keeping them (activation
    # checkpointing: less memory, more time, the same result; not part of a run's identity)
    recompute: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


def _world() -> tuple[int, int]:
    return (
        (dist.get_rank(), dist.get_world_size())
        if dist.is_available() and dist.is_initialized()
        else (0, 1)
    )


def _step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)


def _cosine(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train(
    model: Generator,
    data: TokenPairs,
    cfg: TrainConfig,
    out_dir,
    resume: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict:
    """Train `model` on `data`; checkpoints go to `out_dir/train_state.pt`, the loss curve to
    `loss.csv`.

    With `resume`, a run continues from its last checkpoint. `stop_after` ends the run early after
    that many steps (as an interruption would), which is how resumption is tested. A fresh run whose
    loss is already exactly zero on every training pair takes no step (`steps` 0 in the record): it
    is at the loss's global minimum, every gradient is zero, and every AdamW step would leave it as
    it is (the RTN base on PTQ targets: RTN rounds to every target).
    """
    out_dir = Path(out_dir)
    rank, world = _world()
    _check_run(data, cfg, world)
    model.recompute = cfg.recompute
    net = wrap(model, cfg.strategy, world, device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg))
    state_path = out_dir / "train_state.pt"
    run = _run_settings(model.cfg.to_dict(), asdict(cfg))
    step, losses, elapsed, restored_mb = (
        _resume(state_path, run, net, opt, sched, device) if resume else (0, [], 0.0, math.nan)
    )
    conditions, last = model.condition_matrix(), min(cfg.steps, stop_after or cfg.steps)
    exact = step == 0 and _zero_everywhere(net, data, cfg, conditions, device)
    start = time.perf_counter()

    def save(done: int, activation_mb: float) -> None:  # on every rank: fsdp gathers collectively
        seconds = elapsed + time.perf_counter() - start
        write_checkpoint(state_path, run, net, (opt, sched), done, losses, seconds, activation_mb)

    steps = range(step, 0 if exact else last)
    activation_mb = _run_steps(net, (opt, sched), data, cfg, steps, losses, save, device)
    activation_mb = restored_mb if math.isnan(activation_mb) else activation_mb  # no step taken
    if world > 1:
        dist.barrier()
    elapsed += time.perf_counter() - start
    if rank == 0:
        _write_curve(out_dir / "loss.csv", losses, cfg)
    held = bytes_per_rank(net, opt)
    gather_into(model, net)  # the caller's model gets the trained weights, on every rank
    return _record(model, cfg, losses, exact, elapsed, activation_mb, world, device, held)


def _record(
    model, cfg: TrainConfig, losses, exact, elapsed, activation_mb, world, device, held: dict
) -> dict:
    """What `train` returns and the generator directory keeps: steps, final loss, time, memory
    (`held`: `bytes_per_rank`), size and settings of the run."""
    return {
        "steps": len(losses),
        "final_loss": 0.0 if exact else losses[-1] if losses else float("nan"),
        "exact_at_start": exact,
        "train_seconds": elapsed,
        "peak_memory_mb": peak_memory_mb(device),
        "activation_mb": activation_mb,
        "world_size": world,
        "device": str(device),
        "n_params": sum(p.numel() for p in model.parameters()),
        **held,
        "train": asdict(cfg),
    }


def _run_steps(
    net, optimizer, data: TokenPairs, cfg: TrainConfig, steps: range, losses, save, device
):
    """Take the optimizer `steps`, appending each loss (averaged over ranks) to `losses` and calling
    `save(done)` every `ckpt_every` steps and after the last; return the megabytes autograd saved
    on the first step (NaN when none is taken)."""
    rank, world = _world()
    model = unwrapped(net)
    opt, sched = optimizer
    conditions, activation_mb = model.condition_matrix(), float("nan")
    bar = tqdm(
        steps,
        initial=steps.start,
        total=cfg.steps,
        desc="generator",
        disable=rank != 0 or bool(os.environ.get("TQDM_DISABLE")),
    )
    for step in bar:
        batch = _batch(data, cfg, step, rank, world, conditions, device)

        def forward():
            return net(**batch, rng=_step_generator(cfg.seed, step, rank + 1))

        if math.isnan(activation_mb):  # measured once, on the first step of this process
            activation_mb, loss = saved_activation_mb(forward)
        else:
            loss = forward()
        _update(loss, model, opt, sched, cfg)
        losses.append(_mean_over_ranks(loss.detach(), world))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        done = step + 1
        if done % cfg.ckpt_every == 0 or done == steps.stop:
            save(done, activation_mb)
    return activation_mb


def _batch(
    data: TokenPairs, cfg: TrainConfig, step: int, rank: int, world: int, conditions, device
) -> dict:
    """Step `step`'s batch: the same examples for every process count, each process taking its
    share."""
    rng = _step_generator(cfg.seed, step)
    idx = torch.randint(len(data), (cfg.batch_size,), generator=rng)[rank::world]
    return _examples(data, idx, cfg, conditions, device)


def _examples(data: TokenPairs, idx: torch.Tensor, cfg: TrainConfig, conditions, device) -> dict:
    batch = {
        k: t.to(device) if t is not None else None for k, t in data.batch(idx, conditions).items()
    }
    if not cfg.mask_padding:
        batch["mask"] = None
    return batch


@torch.no_grad()
def _zero_everywhere(net, data: TokenPairs, cfg: TrainConfig, conditions, device) -> bool:
    """Whether the loss is exactly 0 on every training pair (checked a batch at a time, stopping at
    the first that is not: one extra forward pass for a generator that has something to learn), so
    that no step would change the weights (AdamW's weight decay would: then it is never 0)."""
    if cfg.weight_decay != 0:
        return False
    for idx in torch.arange(len(data)).split(cfg.batch_size):
        batch = _examples(data, idx, cfg, conditions, device)
        if net(**batch, rng=_step_generator(cfg.seed, 0, 1)).item() != 0:
            return False
    return True


def _update(loss: torch.Tensor, model, opt, sched, cfg: TrainConfig) -> None:
    """One optimiser step on `loss`: backward, gradient clipping, AdamW, the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()


def _check_run(data: TokenPairs, cfg: TrainConfig, world: int) -> None:
    """Refuse settings that cannot train as asked, before any work."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    if data.loss_weighting != cfg.loss_weighting:
        raise ValueError(
            f"the training pairs carry {data.loss_weighting!r} loss weights but the run asks for "
            f"{cfg.loss_weighting!r}; rebuild them with "
            f"TokenPairs.build(..., loss_weighting={cfg.loss_weighting!r})"
        )
    if not cfg.mask_padding and cfg.loss_weighting != "element":
        raise ValueError(
            "mask_padding=False trains on every position with equal weight, which drops the "
            f"{cfg.loss_weighting!r} loss weights: keep mask_padding=True or use "
            "loss_weighting='element'"
        )


def _resume(state_path: Path, run: dict, net, opt, sched, device) -> tuple:
    """Load the last checkpoint of this same `run` (`_run_settings`) into model, optimiser and
    schedule: (step, losses, seconds, activation MB measured on its first step). Every process
    reads the file (each takes its own shards under fsdp)."""
    state = read_checkpoint(state_path, device)
    if state is None:
        return 0, [], 0.0, math.nan
    if _completed(state.get("run")) != run:
        raise ValueError(
            f"{state_path} holds a run with other settings ({state.get('run')}); "
            "resume only the same run: pick a new output directory or pass resume=False"
        )
    load_full_state(net, opt, state["model"], state["opt"])
    sched.load_state_dict(state["sched"])
    return state["step"], state["losses"], state["elapsed"], state.get("activation_mb", math.nan)


def _run_settings(generator: dict, train: dict) -> dict:
    """What identifies a run when resuming: the generator's settings and the training's, less
    `strategy` (how processes share the work, which changes the result only by float rounding) and
    `recompute` (what memory it takes, which does not change it)."""
    kept = {k: v for k, v in train.items() if k not in ("strategy", "recompute")}
    return {"generator": generator, "train": kept}


def _completed(run: dict | None) -> dict | None:
    """A stored run's settings with the defaults of fields added since it was saved filled in."""
    try:
        return _run_settings(
            GeneratorConfig(**run["generator"]).to_dict(), asdict(TrainConfig(**run["train"]))
        )
    except (KeyError, TypeError, ValueError):
        return run


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


def _write_curve(path: Path, losses: list[float], cfg: TrainConfig) -> None:
    lr = _cosine(cfg)
    with atomic_write(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr"])
        for i, loss in enumerate(losses):
            w.writerow([i + 1, f"{loss:.6g}", f"{cfg.lr * lr(i):.6g}"])


def fit_generator(
    tokenizer: Tokenizer,
    data: TokenPairs,
    gen_cfg: GeneratorConfig,
    cfg: TrainConfig,
    out_dir,
    device: str = "cpu",
    resume: bool = True,
    stop_after: int | None = None,
) -> QuantGen:
    """Build, train and save a generator directory that `QuantGen.load` reads back (`stop_after`:
    as in `train`)."""
    if gen_cfg.conditions != data.conditions:
        raise ValueError(
            f"generator conditions {gen_cfg.conditions} differ from the data's {data.conditions}"
        )
    torch.manual_seed(cfg.seed)
    model = Generator.for_tokenizer(gen_cfg, tokenizer)
    record = train(model, data, cfg, out_dir, resume=resume, device=device, stop_after=stop_after)
    qg = QuantGen(model.cpu(), tokenizer, record)
    if _world()[0] == 0:
        qg.save(out_dir)
    return qg


def main(argv: list[str] | None = None) -> None:
    """Command line for (torchrun) training from a data directory holding `pairs.safetensors` +
    tokenizer."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        required=True,
        help="directory with pairs.safetensors, tokenizer.json/.safetensors",
    )
    p.add_argument(
        "--out", required=True, help="generator directory to write (resumes if it holds a run)"
    )
    p.add_argument("--config", help="JSON file with {'generator': {...}, 'train': {...}} overrides")
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--stop-after", type=int, help="end after this many steps, as an interruption would"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    tokenizer = Tokenizer.load(args.data)
    data = TokenPairs.load(Path(args.data) / "pairs.safetensors")
    overrides = read_json(args.config) if args.config else {}
    gen_cfg = GeneratorConfig(
        **{
            "token_size": tokenizer.shape[1],
            "n_tokens": tokenizer.shape[0],
            "conditions": data.conditions,
            "target": tokenizer.target,
            **overrides.get("generator", {}),
        }
    )
    cfg = TrainConfig(**overrides.get("train", {}))
    if args.steps:
        cfg.steps = args.steps
    fit_generator(
        tokenizer, data, gen_cfg, cfg, args.out, device=args.device, stop_after=args.stop_after
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
