"""RPG's diffusion head: a small 1D conv denoiser per token, trained and sampled as a DDPM.

In RPG (and in QuantGen's Table 5 ablation) the sequence backbone does not emit tokens directly; its
output at each position is a *condition* for a diffusion model that generates that position's token.
Every token is denoised independently by the same network, so the head sees (N, token_size) rows,
N = batch x positions.

    ConvDenoiser   f_theta(x_t, t, cond): a 1D conv encoder-decoder over the token (a 1-channel
                   signal of length token_size), channels 1-32-64-128-64-32-1, kernel 7, additive
                   skips; before every conv the condition is added and the timestep's embedding
                   multiplies, RPG's `(x + c) * t`
    DiffusionHead  DDPM (linear betas 1e-4..0.02, T=1000) predicting the noise (RPG's) or the clean
                   token (`prediction: x0`, which 10_rpg's overfit test needs at our budget): `loss`
                   on a random subset of token positions per step (RPG's "diffusion batch"),
                   `sample` by DDPM or DDIM

Randomness always comes from an optional torch.Generator, which may live on another device than the
head (training draws from CPU generators), so a seeded run is reproducible on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

SAMPLERS = ("ddpm", "ddim")
PREDICTIONS = ("eps", "x0")
# The denoiser's shape (RPG's ConditionalUNet, narrowed): widths from the 1-channel token and back,
# odd kernels that keep the token length, the width of the sinusoidal timestep embedding.
CHANNELS, KERNEL_SIZE, TIME_DIM = (1, 32, 64, 128, 64, 32, 1), 7, 128


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of integer timesteps (N,): cos and sin at geometric
    frequencies."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _randn(
    shape, rng: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise drawn from `rng` on its own device, moved to `device`."""
    where = rng.device if rng is not None else device
    return torch.randn(shape, generator=rng, device=where, dtype=dtype).to(device)


def _randint(high: int, n: int, rng: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n integers uniform on [0, high), drawn from `rng` on its own device, moved to `device`."""
    where = rng.device if rng is not None else device
    return torch.randint(high, (n,), generator=rng, device=where).to(device)


def _randperm(n: int, rng: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A random permutation of range(n), drawn from `rng` on its own device, moved to `device`."""
    where = rng.device if rng is not None else device
    return torch.randperm(n, generator=rng, device=where).to(device)


class _ConvLayer(nn.Module):
    """One denoiser layer: add the condition and scale by the timestep's embedding (both along the
    length, RPG's `(x + c) * t`), then conv -> BatchNorm -> ELU (the last layer, which outputs the
    prediction, stays linear)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, last: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.post = nn.Identity() if last else nn.Sequential(nn.BatchNorm1d(c_out), nn.ELU())

    def forward(self, h: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.post(self.conv((h + cond[:, None, :]) * temb[:, None, :]))


class ConvDenoiser(nn.Module):
    """Predicts the noise in a noisy token, conditioned on the backbone's output at its position.

    The token is a 1-channel signal of length `token_size`; convolutions keep the length (no
    downsampling, as in RPG), so any token_size works. `channels` must be a palindrome from 1 to 1:
    the first half encodes, the second half decodes, and each decoder layer's input gets the encoder
    activation of the same width added (RPG's skips). The condition is projected by one Linear to a
    length-token_size signal that is added to every channel of every layer's input; the sinusoidal
    timestep embedding goes through an MLP to another length-token_size signal that multiplies it
    (RPG's `ConditionalUNet`: `(x + c) * t`), so the timestep can scale what each layer passes on.
    """

    def __init__(
        self,
        token_size: int,
        cond_dim: int,
        channels: tuple[int, ...] = CHANNELS,
        kernel_size: int = KERNEL_SIZE,
        time_dim: int = TIME_DIM,
    ):
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 3 or channels[0] != 1 or channels != channels[::-1]:
            raise ValueError(
                f"channels must be a palindrome from 1 to 1 with a hidden layer, got {channels}"
            )
        if time_dim % 2:
            raise ValueError(f"time_dim must be even (cos and sin halves), got {time_dim}")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd so convolutions keep the token length, got {kernel_size}"
            )
        self.token_size, self.time_dim = token_size, time_dim
        self.cond_proj = nn.Linear(cond_dim, token_size)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, token_size), nn.SiLU(), nn.Linear(token_size, token_size)
        )
        n = len(channels) - 1
        self.layers = nn.ModuleList(
            _ConvLayer(channels[i], channels[i + 1], kernel_size, last=i == n - 1) for i in range(n)
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (N, token_size), t (N,) long, cond (N, cond_dim) -> predicted noise
        (N, token_size)."""
        c = self.cond_proj(cond)
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        n = len(self.layers)
        acts = [x_t[:, None, :]]  # acts[i]: output of layer i - 1 (acts[0]: the noisy token)
        for i, layer in enumerate(self.layers):
            # channels is a palindrome, so acts[i] and acts[n - i] have the same width: decoder
            # layers (i > n - i) add the mirrored encoder activation, RPG's skip connection
            h = acts[i] + acts[n - i] if i > n - i else acts[i]
            acts.append(layer(h, c, temb))
        return acts[-1][:, 0, :]


class DiffusionHead(nn.Module):
    """DDPM over tokens with epsilon prediction, conditioned per position on the backbone's output.

    token_size, cond_dim: widths of a token and of the condition vector at its position.
    channels, kernel_size, time_dim: the ConvDenoiser's.
    n_steps, beta_start, beta_end: the linear beta schedule (RPG: 1000 steps, 1e-4..0.02).
    diffusion_batch: token positions per training step, drawn at random (RPG's "diffusion batch
        size", which saves memory on long sequences); None trains on every position.
    sampler, sample_steps: how `sample` runs by default: "ddpm" over all n_steps (RPG's default
        solver), or "ddim" with `sample_steps` evenly spaced steps (RPG-Large: DDIM, 60 steps).
    prediction: what the denoiser outputs and the loss compares: "eps", the noise (RPG's), or "x0",
        the clean token (the same sampler, with eps derived from it).
    """

    def __init__(
        self,
        token_size: int,
        cond_dim: int,
        channels: tuple[int, ...] = CHANNELS,
        kernel_size: int = KERNEL_SIZE,
        time_dim: int = TIME_DIM,
        n_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        diffusion_batch: int | None = None,
        sampler: str = "ddpm",
        sample_steps: int | None = None,
        prediction: str = "eps",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.token_size, self.n_steps, self.diffusion_batch = token_size, n_steps, diffusion_batch
        self.prediction = prediction
        self._check_sampler(sampler, sample_steps)
        self.sampler, self.sample_steps = sampler, sample_steps
        self.net = ConvDenoiser(token_size, cond_dim, channels, kernel_size, time_dim)
        betas = torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
        # Derived from the arguments, so not saved: a state_dict holds only learned weights and BN
        # statistics.
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer(
            "alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False
        )

    def _check_sampler(self, method: str, steps: int | None) -> None:
        if method not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {method!r}")
        if method == "ddpm" and steps not in (None, self.n_steps):
            raise ValueError(
                f"DDPM runs all {self.n_steps} steps; use method='ddim' for {steps} steps"
            )
        if steps is not None and not 1 <= steps <= self.n_steps:
            raise ValueError(f"steps must be in [1, {self.n_steps}], got {steps}")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,
        for rows x0 (N, token_size) at timesteps t (N,)."""
        abar = self.alphas_cumprod[t][:, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(
        self,
        x0: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        n_tokens: int | None = None,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error between predicted and true noise on a random subset of token
        positions.

        x0 (B, L, token_size) target tokens, cond (B, L, cond_dim) the backbone's output. `mask`
        (bool or 0/1 float, broadcastable to x0) marks real values: padding is excluded from the
        loss and zeroed in x0, so its content cannot leak into real values through the convolutions.
        `n_tokens` positions (default `diffusion_batch`; all if None) are drawn among those holding
        any real value.
        """
        w = None if mask is None else mask.to(x0.dtype).expand_as(x0).reshape(-1, self.token_size)
        x0, cond = x0.reshape(-1, self.token_size), cond.reshape(-1, cond.shape[-1])
        idx = self._pick_tokens(w, x0.shape[0], n_tokens or self.diffusion_batch, rng, x0.device)
        x0, cond = x0[idx], cond[idx]
        t = _randint(self.n_steps, x0.shape[0], rng, x0.device)
        noise = _randn(x0.shape, rng, x0.device, x0.dtype)
        if w is not None:
            w = w[idx]
            x0 = torch.where(w > 0, x0, torch.zeros_like(x0))
        truth = noise if self.prediction == "eps" else x0
        err = (self.net(self.q_sample(x0, t, noise), t, cond) - truth) ** 2
        return err.mean() if w is None else (err * w).sum() / w.sum().clamp_min(1)

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) that the denoiser sees in x at timesteps t: one is its output, the other
        follows from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        abar = self.alphas_cumprod[t][:, None]
        out = self.net(x, t, cond)
        if self.prediction == "eps":
            return (x - (1 - abar).sqrt() * out) / abar.sqrt(), out
        return out, (x - abar.sqrt() * out) / (1 - abar).sqrt()

    @staticmethod
    def _pick_tokens(
        w: torch.Tensor | None,
        n_rows: int,
        n_tokens: int | None,
        rng: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Indices of the rows to train on: all rows with a real value, or a random `n_tokens` of
        them."""
        rows = torch.arange(n_rows, device=device) if w is None else (w > 0).any(-1).nonzero()[:, 0]
        if n_tokens is None or n_tokens >= len(rows):
            return rows
        return rows[_randperm(len(rows), rng, device)[:n_tokens]]

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        steps: int | None = None,
        method: str | None = None,
        eta: float = 0.0,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Tokens (B, L, token_size) generated for conditions cond (B, L, cond_dim).

        method "ddpm": ancestral sampling over all n_steps with the posterior variance (RPG's
        DDPMSampler).
        method "ddim": `steps` evenly spaced steps; eta=0 is deterministic given the initial noise,
        eta=1 has DDPM's variance. With no method, the constructor's `sampler` and `sample_steps`
        apply.
        Runs the denoiser in eval mode (BatchNorm's running statistics) and restores the mode after.
        """
        if method is None:
            method, steps = self.sampler, steps or self.sample_steps
        self._check_sampler(method, steps)
        flat = cond.reshape(-1, cond.shape[-1])
        x = _randn((flat.shape[0], self.token_size), rng, flat.device, flat.dtype)
        was_training = self.training
        self.eval()  # BatchNorm must use its running statistics, and sampling must not update them
        try:
            if method == "ddpm":
                x = self._ddpm(x, flat, rng)
            else:
                x = self._ddim(x, flat, steps or self.n_steps, eta, rng)
        finally:
            self.train(was_training)
        return x.reshape(*cond.shape[:-1], self.token_size)

    def _ddpm(
        self, x: torch.Tensor, cond: torch.Tensor, rng: torch.Generator | None
    ) -> torch.Tensor:
        """x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,
        for t = T-1 .. 0."""

        abar = self.alphas_cumprod
        for step in reversed(range(self.n_steps)):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            beta = self.betas[step]
            eps = self.predict(x, t, cond)[1]
            x = (x - beta / (1 - abar[step]).sqrt() * eps) / (1 - beta).sqrt()
            if step > 0:
                var = beta * (1 - abar[step - 1]) / (1 - abar[step])
                x = x + var.sqrt() * _randn(x.shape, rng, x.device, x.dtype)
        return x

    def _ddim(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        steps: int,
        eta: float,
        rng: torch.Generator | None,
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021, Eq. 12) from t = T-1 down to t = 0 in `steps` evenly spaced
        steps; the last step goes to abar = 1, i.e. returns the predicted x0."""
        ts = torch.linspace(self.n_steps - 1, 0, steps).round().long().tolist()
        one = torch.ones((), device=x.device)
        for i, step in enumerate(ts):
            abar = self.alphas_cumprod[step]
            abar_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else one
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            x0, eps = self.predict(x, t, cond)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps
            if eta > 0:
                x = x + sigma * _randn(x.shape, rng, x.device, x.dtype)
        return x
