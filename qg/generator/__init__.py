"""The parameter generator: weights cut into tokens, a Mamba-2 (or LSTM / Transformer) body, a head,
its training loop, and RPG mode.

Modules, each importing only those above it here (and packages listed before this one in qg):
  mamba2     pure-PyTorch Mamba-2 mixer, state_dict-compatible with mamba_ssm.Mamba2
  diffusion  RPG-style diffusion head (1D conv denoiser + DDPM/DDIM), for the ablation
  layout     which token holds what: a checkpoint's layers as fixed-width tokens, 2D positions
  target_values  what a quantized layer's target tokens hold (codes or q - Z, log S, RTN offsets)
  tokenizer  checkpoints <-> fixed-width token sequences, with a layout and position embedding
  loss       what the MSE counts at each target position: weights, and dead zones from RTN
  model      the generator: mixer blocks (Mamba-2, LSTM, Transformer) + embeddings + head
  directory  a trained generator's files, and QuantGen: generator + tokenizer, one forward pass
  pairs      the training set: fp tokens in, target tokens out, with bases, masks and dead zones
  memory     a training step's memory: peak, and the tensors saved for the backward pass
  parallel   DDP or FSDP2 across processes, and the checkpoint of full state either way
  train      the training loop (AdamW + cosine, resumable, DDP or FSDP)
  rpg        RPG mode: whole full-precision models sampled from noise (tokenizer of every tensor,
             fit, sample)
"""
