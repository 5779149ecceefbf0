"""What training the `paper` profile's generators would cost, from their shapes alone: each
generator built on PyTorch's meta device (nothing allocated), its parameters, training state,
saved activations per sample and memory per GPU under DDP and FSDP. The README's table is
`paper_shapes_table` of these rows (a test regenerates it)."""

from __future__ import annotations

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


def bench_paper_shapes(profile_name: str = "paper", gpus=(1, 8)) -> list[dict]:
    """What training the profile's generators costs, from their shapes alone (meta device, nothing
    allocated): parameters, the bytes of weights + gradients + AdamW's two moments (float32), the
    activations autograd saves for one training sample (counted by `saved_activation_mb` on a meta
    forward), and the memory per GPU with the profile's batch split over `gpus` under DDP (every
    rank holds the whole state) and FSDP (the state sharded, plus one block gathered at a time).
    Estimates from shapes, not measurements: allocator overhead, temporary buffers and the
    backward pass's own peaks come on top."""
    profile = load_profile(profile_name)
    rows = []
    for arch in profile.archs:
        model, layout = arch_generator(profile, arch)
        params = sum(p.numel() for p in model.parameters())
        block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        sample = torch.zeros(1, layout.n_tokens, layout.token_size, device="meta")
        activation = saved_activation_mb(lambda: model(sample, sample, base=sample))[0] * 2**20
        state = 16 * params  # float32 weights, gradients, AdamW's exp_avg and exp_avg_sq
        for n in gpus:
            per_gpu = -(-profile.train.batch_size // n)
            gathered = 4 * block if n > 1 else 0  # FSDP: one block's float32 weights at a time
            for strategy, held in (("ddp", state), ("fsdp", state / n + gathered)):
                rows.append(
                    {
                        "bench": "paper-shapes",
                        "profile": profile.name,
                        "arch": profile.set_in("archs", arch)["arch"],
                        "token_size": layout.token_size,
                        "n_tokens": layout.n_tokens,
                        "params": params,
                        "state_gb": state / 2**30,
                        "activation_gb_per_sample": activation / 2**30,
                        "gpus": n,
                        "strategy": strategy,
                        "samples_per_gpu": per_gpu,
                        "memory_gb_per_gpu": (held + per_gpu * activation) / 2**30,
                    }
                )
    return rows


def paper_shapes_table(rows: pd.DataFrame) -> str:
    """`bench_paper_shapes`'s rows as the README's Markdown table: one row per generator, the
    memory per GPU by strategy and GPU count."""
    wide = rows.pivot_table(
        index=["arch", "token_size", "n_tokens", "params", "state_gb", "activation_gb_per_sample"],
        columns=["strategy", "gpus"],
        values="memory_gb_per_gpu",
    )
    wide.columns = [f"GiB/GPU, {s.upper()} x{n}" for s, n in wide.columns]
    wide = wide.reset_index().assign(params=lambda d: (d.params / 1e6).round(0).astype(int))
    wide = wide.rename(
        columns={
            "arch": "target model",
            "token_size": "token",
            "n_tokens": "tokens",
            "params": "generator params (M)",
            "state_gb": "weights+grads+AdamW (GiB)",
            "activation_gb_per_sample": "activations per sample (GiB)",
        }
    )
    return wide.round(1).to_markdown(index=False)
