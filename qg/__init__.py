"""QuantGen reproduction: generate quantized weights (codes, scale S, zero point Z) from full-precision ones.

Modules, one concept each:
  data        datasets (Fashion-MNIST, digits, CIFAR, ImageNet folder)
  models      timm target models from a JSON-able description; train / fine-tune / evaluate
  quant       quantizer (QuantSpec, quantize, dequantize) and the quantized safetensors format
  tokenizer   checkpoints <-> fixed-width token sequences, with a layout and position embedding
  mamba2      pure-PyTorch Mamba-2 mixer, state_dict-compatible with mamba_ssm.Mamba2
  diffusion   RPG-style diffusion head (1D conv denoiser + DDPM/DDIM), for the ablation
  generator   the QuantGen generator (backbone + embeddings + head) and its files
  train       the training loop (AdamW + cosine, resumable, DDP)
"""

__version__ = "0.1.0"
