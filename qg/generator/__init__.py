"""The parameter generator: weights cut into tokens, a Mamba-2 (or LSTM / Transformer) body, a head,
its training loop, and RPG mode.

Modules, each importing only those above it here (and packages listed before this one in qg):
  mamba2     pure-PyTorch Mamba-2 mixer, state_dict-compatible with mamba_ssm.Mamba2
  diffusion  RPG-style diffusion head (1D conv denoiser + DDPM/DDIM), for the ablation
  tokenizer  checkpoints <-> fixed-width token sequences, with a layout and position embedding
  model      the QuantGen generator (mixer blocks + embeddings + head) and its files
  train      the training loop (AdamW + cosine, resumable, DDP)
  rpg        RPG mode: whole full-precision models sampled from noise (tokenizer of every tensor,
             fit, sample)
"""
