"""What training the `paper` profile's generators would cost, from their shapes alone: each
generator built on PyTorch's meta device (nothing allocated), its parameters, training state,
saved activations per sample and memory per GPU under DDP and FSDP. The README's table is
`paper_shapes_table` of these rows (a test regenerates it)."""

from __future__ import annotations

import itertools

import pandas as pd
import torch

from ..config.profiles import load_profile
from ..generator.layout import Layout
from ..generator.memory import saved_activation_mb
from ..generator.model import Generator, GeneratorConfig
from ..quant.quantizer import is_quantized_weight
from ..targets.models import ModelSpec, build_model


def arch_config(profile, arch: str, part: str) -> dict:
    """The profile's `tokenizer`, `generator` or `train` keys as written, updated by the
    architecture's own entry (ViT-Base's larger tokens), as a generator of `arch` is trained."""
    return {**profile.set_in(part), **profile.set_in("archs", arch, part)}


def arch_generator(profile, arch: str, device="meta", **generator):
    """The generator the profile trains for `arch` (its tokens laid out over the timm model's
    quantized weights, `generator` overriding its architecture), and its layout. On the meta
    device (the default): shapes without memory or compute."""
    token_size = arch_config(profile, arch, "tokenizer").get("token_size")
    token_size = token_size or profile.tokenizer.token_size
    with torch.device("meta"):
        target = build_model(ModelSpec.from_dict(profile.set_in("archs", arch)))
    shapes = [
        (n, tuple(p.shape)) for n, p in target.state_dict().items() if is_quantized_weight(n, p)
    ]
    layout = Layout(shapes, [profile.quant.spec(8, "group")], token_size)
    generator = {**arch_config(profile, arch, "generator"), **generator}
    cfg = GeneratorConfig(token_size=token_size, n_tokens=layout.n_tokens, **generator)
    with torch.device(device):
        return Generator(cfg, layout.positions().to(device)), layout


def _activations(model, layout) -> tuple[float, float]:
    """Bytes of activations per training sample: what autograd saves for the backward pass, and
    the peak with `recompute` (each block's input kept, one block's activations at a time)."""
    sample = torch.zeros(1, layout.n_tokens, layout.token_size, device="meta")
    kept = saved_activation_mb(lambda: model(sample, sample, base=sample))[0]
    model.recompute = True
    inputs = saved_activation_mb(lambda: model(sample, sample, base=sample))[0]
    model.recompute = False
    h = torch.zeros(1, layout.n_tokens, model.cfg.d_model, device="meta", requires_grad=True)
    one_block = max(saved_activation_mb(lambda: b(h))[0] for b in model.blocks)
    return kept * 2**20, (inputs + one_block) * 2**20


def bench_paper_shapes(profile_name: str = "paper", gpus=(1, 8)) -> list[dict]:
    """What training the profile's generators costs, from their shapes alone (meta device, nothing
    allocated): parameters, the bytes of weights + gradients + AdamW's two moments (float32), the
    activations autograd saves for one training sample (counted by `saved_activation_mb` on a meta
    forward; with `train.recompute`, the blocks' inputs plus one block's activations), and the
    memory per GPU with the profile's batch split over `gpus` under DDP (every rank holds the whole
    state) and FSDP (the state sharded, plus one block gathered at a time), with and without
    recompute. Estimates from shapes, not measurements: allocator overhead, temporary buffers and
    the backward pass's own peaks come on top."""
    profile = load_profile(profile_name)
    rows = []
    for arch in profile.archs:
        model, layout = arch_generator(profile, arch)
        params = sum(p.numel() for p in model.parameters())
        block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        activations = dict(zip((False, True), _activations(model, layout)))
        state = 16 * params  # float32 weights, gradients, AdamW's exp_avg and exp_avg_sq
        for n, strategy, recompute in itertools.product(gpus, ("ddp", "fsdp"), (False, True)):
            per_gpu = -(-profile.train.batch_size // n)
            gathered = 4 * block if n > 1 else 0  # FSDP: one block's float32 weights at a time
            held = state if strategy == "ddp" else state / n + gathered
            rows.append(
                {
                    "bench": "paper-shapes",
                    "profile": profile.name,
                    "arch": profile.set_in("archs", arch)["arch"],
                    "token_size": layout.token_size,
                    "n_tokens": layout.n_tokens,
                    "params": params,
                    "state_gb": state / 2**30,
                    "activation_gb_per_sample": activations[False] / 2**30,
                    "recompute_gb_per_sample": activations[True] / 2**30,
                    "gpus": n,
                    "strategy": strategy,
                    "recompute": recompute,
                    "samples_per_gpu": per_gpu,
                    "memory_gb_per_gpu": (held + per_gpu * activations[recompute]) / 2**30,
                }
            )
    return rows


# the README's memory per GPU: (strategy, GPUs, recompute) -> column (on one GPU DDP = FSDP)
_MEMORY_COLUMNS = {
    ("ddp", 1, False): "GiB/GPU, 1 GPU",
    ("ddp", 1, True): "1 GPU, recompute",
    ("ddp", 8, False): "DDP x8",
    ("fsdp", 8, False): "FSDP x8",
    ("fsdp", 8, True): "FSDP x8, recompute",
}


def paper_shapes_table(rows: pd.DataFrame) -> str:
    """`bench_paper_shapes`'s rows as the README's Markdown table: one row per generator, the
    memory per GPU by strategy, GPU count and recompute."""
    index = ["arch", "token_size", "n_tokens", "params", "state_gb", "activation_gb_per_sample"]
    index.append("recompute_gb_per_sample")
    wide = rows.pivot_table(
        index=index, columns=["strategy", "gpus", "recompute"], values="memory_gb_per_gpu"
    )
    wide = wide[[c for c in _MEMORY_COLUMNS if c in wide.columns]]
    wide.columns = [_MEMORY_COLUMNS[c] for c in wide.columns]
    wide = wide.reset_index().assign(params=lambda d: (d.params / 1e6).round(0).astype(int))
    wide = wide.rename(
        columns={
            "arch": "target model",
            "token_size": "token",
            "n_tokens": "tokens",
            "params": "generator params (M)",
            "state_gb": "weights+grads+AdamW (GiB)",
            "activation_gb_per_sample": "activations per sample (GiB)",
            "recompute_gb_per_sample": "with recompute (GiB)",
        }
    )
    return wide.round(1).to_markdown(index=False)
