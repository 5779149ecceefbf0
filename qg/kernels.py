"""Which CPU kernels torch computes with, pinned so that a run's floats do not depend on the machine it got.

Measured on this project's 2-core machines (torch 2.14.1, Intel Xeon with AVX-512 and AMX): training the cpu
profile's ViT for 60 steps from the same seed gives bit-identical weights run after run in one configuration,
and different weights whenever one of these changes: the number of OpenMP threads (1 vs 2), MKL's code path
(`MKL_CBWR`), oneDNN's instruction set (`ONEDNN_MAX_CPU_ISA`). Over a whole collection run (01_collect) the
ViT's checkpoints came out in one of two states depending on the session's machine (FP32 on the held-out run
85.30 % or 85.20 %, on the head task 69.33 % or 69.76 %), while the Mixer's were the same on all three machines
checked. So results are reproducible only given the kernels and the thread count, and both are recorded in
every provenance file (`describe`).

`pin` fixes the kernels to the AVX2 paths of MKL, oneDNN and ATen's own vectorised code, which every x86-64
CPU of the last ten years has, instead of whatever the machine's best is. That costs time where the machine has
better: on an AVX-512 Xeon, 01_collect's pretraining took 23.0 s instead of 16.6 s (ViT) and 18.2 s instead of
12.2 s (Mixer), about 1.4x. That two machines then agree is what MKL documents for its conditional numerical
reproducibility mode at a fixed thread count; for the whole stack it is expected, not yet observed (a rerun on
another machine type, compared with the committed 01_collect table, is the check). It takes effect only if
set before torch is first imported: `import qg` does it when it comes first, and the pipeline sets it for
every kernel it starts (they inherit the environment). Variables already set are left alone, and
QG_NATIVE_KERNELS=1 turns pinning off (the machine's fastest kernels; results then carry its fingerprint).
The thread count is not pinned: it is the machine's core count (or OMP_NUM_THREADS), and `qg.pipeline --jobs`
changes it, so a run with jobs > 1 is not bit-identical to a serial one.
"""

from __future__ import annotations

import os
import platform
import sys

PINNED = {"MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def pin(environ=os.environ) -> bool:
    """Set the pinned kernels in `environ` where unset (nothing if QG_NATIVE_KERNELS=1); whether this process
    computes with them: not if torch was imported before, when only the processes it starts will."""
    if environ.get("QG_NATIVE_KERNELS") == "1":
        return False
    for name, value in PINNED.items():
        environ.setdefault(name, value)
    return "torch" not in sys.modules


def describe() -> dict:
    """The kernels this process computes with: what a provenance file needs to say for its floats to be
    reproducible (CPU, threads, ATen's instruction set in effect, MKL's and oneDNN's settings)."""
    import torch

    return {"cpu": _cpu_model(), "threads": torch.get_num_threads(),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ.get(name, "native") for name in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()
