"""QuantGen reproduction: generate quantized weights (codes, scale S, zero point Z) from full-precision ones.

Modules, one job each; each imports only modules above it in this list:
  kernels      the CPU kernels torch computes with, pinned before torch loads (floats independent of the machine)
  io           the cache rule, atomic writes, checked safetensors reads, content hashes; ROOT
  report       tidy tables, provenance (commit, inputs), deterministic figures
  paper        the paper's own numbers, printed beside ours
  data         datasets (Fashion-MNIST, digits, CIFAR, ImageNet folder)
  packing      N-bit codes packed into bytes (the file format's codes)
  qwt          QwT: closed-form linear compensation per block on top of any quantization
  quant        quantizer (QuantSpec, quantize, dequantize) and the quantized safetensors format
  mamba2       pure-PyTorch Mamba-2 mixer, state_dict-compatible with mamba_ssm.Mamba2
  diffusion    RPG-style diffusion head (1D conv denoiser + DDPM/DDIM), for the ablation
  models       timm target models from a JSON-able description; train / fine-tune / evaluate
  runtime      a quantized model kept packed in memory, dequantized per layer; its memory and latency
  baselines    data-free quantizers beside PTQ (asymmetric RTN, MSE clipping, HQQ)
  tokenizer    checkpoints <-> fixed-width token sequences, with a layout and position embedding
  fidelity     how faithful a generated quantized model is, and whether it follows its input
  generator    the QuantGen generator (mixer blocks + embeddings + head) and its files
  train        the training loop (AdamW + cosine, resumable, DDP)
  rpg          RPG mode: whole full-precision models sampled from noise (tokenizer of every tensor, fit, sample)
  schema       the profile schema: every key's type, range and meaning (pydantic)
  profiles     a run's settings (params/<name>.yaml), validated, and where its files live
  collect      collecting checkpoints and QAT targets (01_collect), and reading them back
  scoring      top-1 of a model file on the profile's test subset, predictions cached beside the file
  experiments  the generators each table needs and every method's quantized file (PTQ, controls, Gen)
  evaluation   scoring the experiments into tidy rows: evaluate, diagnose, convergence, ablations
  rpg_study    RPG's own experiment (10_rpg): its samples, the baselines and the memorisation tests, scored
  tables       the paper's tables and figures from per-checkpoint scores
  pipeline     the papermill runner; __main__ the command line; bench the speed benchmark
"""

__version__ = "0.1.0"

from . import kernels  # noqa: E402  (before any module that imports torch)

kernels.pin()
