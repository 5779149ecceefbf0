"""Speed and memory, printed as figures from one run: `python -m qg.bench --help`.

Modules, one comparison each; each imports only those above it in this list:
  mixers    the generator's sequence mixers: the chunked SSD scan against the plain recurrence,
            one block per backbone (Mamba-2, LSTM, attention), qg's Mamba-2 against mamba-ssm's
            kernels
  runtime   quantized models kept packed against FP32 on the CPU: weight bytes, seconds per batch,
            seconds to quantize
  shapes    the paper profile's generators from their shapes alone: parameters, training state,
            activations, memory per GPU under DDP and FSDP
  gpu       the one GPU check (`make gpu-check`): qg's Mamba-2 against mamba-ssm's, generator speed
            by backbone, training steps of the paper profile's generator on fake checkpoints
  __main__  the command line: which sections, at which sizes, into which CSV

Ratios are taken within one run on one machine; absolute times depend on the machine and its load.
"""

# 06_ablate_backbone calls `bench.bench_backbones`
from .mixers import bench_backbones, bench_kernels, bench_scan  # noqa: F401
