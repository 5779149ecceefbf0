"""Which CPU kernels torch computes with, pinned so that a run's floats do not depend on the machine
it got.

Measured on this project's 2-core machines (torch 2.14.1, Intel Xeon with AVX-512 and AMX): training
the cpu profile's ViT for 60 steps from the same seed gives bit-identical weights run after run in
one configuration, and different weights whenever one of these changes: the number of OpenMP threads
(1 vs 2), MKL's code path (`MKL_CBWR`), oneDNN's instruction set (`ONEDNN_MAX_CPU_ISA`). Over a
whole collection run (01_collect) the ViT's checkpoints came out in one of two states depending on
the session's machine (FP32 on the held-out run 85.30 % or 85.20 %, on the head task 69.33 % or
69.76 %), while the Mixer's were the same on all three machines checked. So results are reproducible
only given the kernels and the thread count, and both are recorded in every provenance file
(`describe`).

`pin` fixes the kernels to the AVX2 paths of MKL, oneDNN and ATen's own vectorised code, which every
x86-64 CPU of the last ten years has, instead of whatever the machine's best is. That costs time
where the machine has better: on an AVX-512 Xeon, 01_collect's pretraining took 23.0 s instead of
16.6 s (ViT) and 18.2 s instead of 12.2 s (Mixer), about 1.4x. That two machines then agree is what
MKL documents for its conditional numerical reproducibility mode at a fixed thread count, but for
the whole stack it does not hold: pinned, an AMD EPYC (AVX-512) gave the Mixer's checkpoints of the
Intel Xeon's pinned run bit for bit and the ViT's in a third state (FP32 on the held-out run 85.06 %
against 85.18 %, head task 69.98 % against 69.89 %). `fingerprint` (`python -m qg.core.kernels`)
digests the output of each primitive the models train with, so that two machines' printouts say
which op is to blame; on that EPYC, native kernels change conv2d, GELU, softmax and cross-entropy
against pinned ones, and 1 thread against 2 changes softmax. It takes effect only if set before
torch is first imported: `import qg` does it when it comes first, and the pipeline sets it for every
kernel it starts (they inherit the environment). Variables already set are left alone, and
QG_NATIVE_KERNELS=1 turns pinning off (the machine's fastest kernels; results then carry its
fingerprint). The thread count is not pinned: it is the machine's core count (or OMP_NUM_THREADS),
and `qg.pipeline --jobs` changes it, so a run with jobs > 1 is not bit-identical to a serial one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys

PINNED = {"MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def pin(environ=os.environ) -> bool:
    """Set the pinned kernels in `environ` where unset (nothing if QG_NATIVE_KERNELS=1); whether
    this process computes with them: not if torch was imported before, when only the processes it
    starts will."""
    if environ.get("QG_NATIVE_KERNELS") == "1":
        return False
    for name, value in PINNED.items():
        environ.setdefault(name, value)
    return "torch" not in sys.modules


def describe() -> dict:
    """The kernels this process computes with: what a provenance file needs to say for its floats to
    be reproducible (CPU, threads, ATen's instruction set in effect, MKL's and oneDNN's
    settings)."""
    import torch

    return {
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        **{name: os.environ.get(name, "native") for name in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")},
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _digest(*tensors) -> str:
    """The first 12 hex digits of the sha256 of the tensors' bytes."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _fwd_bwd(fn, *inputs) -> str:
    """The digest of `fn`'s output and of its inputs' gradients (of the output's mean)."""
    import torch

    out = fn(*inputs)
    out.backward(torch.ones_like(out) / out.numel())
    return _digest(out, *(i.grad for i in inputs))


def _layer_digests(g) -> dict[str, str]:
    """The layers' primitives, forward and backward, at the cpu profile's ViT shapes."""
    import torch
    import torch.nn.functional as F

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, w, b = rand(128, 17, 48), rand(96, 48), rand(96)
    q, k, v = (rand(128, 3, 17, 16) for _ in range(3))
    img, kernel = rand(128, 1, 28, 28), rand(48, 1, 7, 7)
    return {
        "linear": _fwd_bwd(lambda x, w, b: F.linear(x, w, b), x, w, b),
        "conv2d (patches)": _fwd_bwd(lambda i, k: F.conv2d(i, k, stride=7), img, kernel),
        "layer_norm": _fwd_bwd(lambda x: F.layer_norm(x, (48,)), rand(128, 17, 48)),
        "gelu": _fwd_bwd(F.gelu, rand(128, 17, 96)),
        "softmax": _fwd_bwd(lambda x: x.softmax(-1), rand(128, 3, 17, 17)),
        "attention (sdpa)": _fwd_bwd(F.scaled_dot_product_attention, q, k, v),
        "attention (by hand)": _fwd_bwd(
            lambda q, k, v: ((q @ k.transpose(-2, -1)) * 16**-0.5).softmax(-1) @ v,
            *(t.detach().clone().requires_grad_() for t in (q, k, v)),
        ),
        "cross_entropy": _fwd_bwd(
            lambda z: F.cross_entropy(z, torch.arange(128) % 10), rand(128, 10)
        ),
    }


def _optimizer_digests(g) -> dict[str, str]:
    """AdamW's three implementations after three steps, then the element-wise ops its step is made
    of, alone (a vendor difference in `adamw` names one)."""
    import torch

    start, grads = torch.randn(96, 48, generator=g), torch.randn(3, 96, 48, generator=g)
    out = {}
    for name, options in (
        ("adamw", {}),  # torch's default: the foreach implementation
        ("adamw (single tensor)", {"foreach": False}),
        ("adamw (fused)", {"fused": True}),
    ):
        param = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.05, **options)
        for grad in grads:
            param.grad = grad.clone()
            opt.step()
        out[name] = _digest(param)
    a, c = torch.randn(96, 48, generator=g), torch.rand(96, 48, generator=g) + 0.1
    return out | {
        "sqrt": _digest(c.sqrt()),
        "lerp": _digest(a.lerp(c, 0.1)),
        "addcmul": _digest(a.addcmul(c, c, value=0.001)),
        "addcdiv": _digest(a.addcdiv(a, c.sqrt().add(1e-8), value=-1e-3)),
        "pow": _digest(c.pow(0.999)),
    }


def fingerprint(seed: int = 0) -> dict[str, str]:
    """A digest of the exact output of each primitive the target models train with (forward and
    gradients), on seeded inputs of the cpu profile's ViT shapes (batch 128, 17 tokens, width 48, 3
    heads): two machines whose runs differ differ here in the ops to blame. The ViT has all of them;
    the Mixer has no attention."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return _layer_digests(g) | _optimizer_digests(g)


def main(argv: list[str] | None = None) -> None:
    """Print the kernels in effect and the fingerprint of each primitive (compare two machines'
    outputs)."""
    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    import torch  # noqa: F401  (after `import qg` pinned the kernels)

    print(json.dumps({"kernels": describe(), "fingerprint": fingerprint()}, indent=1))


if __name__ == "__main__":
    main()
