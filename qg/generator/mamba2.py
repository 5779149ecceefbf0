"""Mamba-2 mixer in pure PyTorch, state_dict-compatible with `mamba_ssm.modules.mamba2.Mamba2`.

Same constructor signature and defaults, parameter names, shapes, initialisation and registration
order as mamba_ssm 2.x, so a state_dict trained with the CUDA kernels loads strictly here and the
reverse.

    in_proj(u) -> [z0, x0 | z | xBC | dt]  (z0, x0 only when d_ssm < d_inner: a gated MLP part)
    xBC = silu(causal depthwise conv1d(xBC));  x, B, C = split(xBC)
    dt  = clamp(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = C_t h_t + D x_t  (per head; B, C per group)
    y   = RMSNorm_grouped(y * silu(z))  (norm after gate by default);  out_proj([silu(z0) * x0, y])

On CPU (and whenever mamba-ssm's kernels are missing or `QG_FORCE_TORCH_MAMBA=1`) the scan is the
chunked SSD algorithm of `ssd_minimal.py` (Dao & Gu, 2024): quadratic attention-like work inside
chunks, a linear recurrence between them. On CUDA with mamba-ssm installed the same weights run
through its fused kernels. Only full-sequence forward is implemented (no inference cache / step):
the generator reads whole sequences.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# mamba-ssm's import fails on machines without CUDA (unguarded selective_scan_cuda), hence Exception
try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as _kernel_rmsnorm
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel_scan
except Exception:  # noqa: BLE001
    _kernel_scan = _kernel_rmsnorm = None
try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv
except Exception:  # noqa: BLE001
    _kernel_conv = None


def segsum_naive(x: torch.Tensor) -> torch.Tensor:
    """What `segsum` computes, written plainly: cumsum[i] - cumsum[j]. Exact in exact arithmetic,
    but the difference of two large running sums loses precision (ssd_minimal's
    `segsum_unstable`)."""
    T = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    return out.masked_fill(
        ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)), -torch.inf
    )


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = sum(x[j+1..i]) for j <= i and -inf above the
    diagonal.

    exp(segsum(dt * A))[i, j] is the decay of the state from step j to step i. Summed directly over
    each segment (a masked cumsum) rather than as a difference of prefix sums (`segsum_naive`), so
    it stays exact for long segments."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    x = x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), -1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(
        ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), 0), -torch.inf
    )


def ssd_scan(x, dt, A, B, C, chunk_size: int = 64, D=None, initial_states=None):
    """Chunked SSD scan. x (b, l, h, p), dt (b, l, h) after softplus, A (h,), B/C (b, l, g, n),
    D (h,) or (h, p).

    Returns y (b, l, h, p). Sequences are zero-padded to a multiple of `chunk_size` (dt = 0 there,
    so the padding neither decays nor feeds the state) and trimmed back. The h heads form g groups
    of r = h / g heads that share B and C, so C_t . B_s is computed once per group, not once per
    head (ssd_minimal repeats B and C for every head; with one group that is h times the work of the
    largest product).
    """
    b, length, h, p = x.shape
    g = B.shape[2]
    pad = -length % chunk_size
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (x, dt, B, C))
    c, r = x.shape[1] // chunk_size, h // g
    X = (x * dt[..., None]).reshape(b, c, chunk_size, g, r, p)
    B, C = (t.reshape(b, c, chunk_size, g, -1) for t in (B, C))
    A = (dt * A).reshape(b, c, chunk_size, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)
    # The sequence map y = M X is a semiseparable matrix M[l, s] = C_l . B_s decay(s -> l), cut into
    # chunks: diagonal blocks are computed as they are (attention-like), off-diagonal blocks through
    # their low-rank factorisation  C (left) x decay between chunks (middle) x B (right).
    # 1. diagonal blocks, the outputs from inputs of the same chunk:
    #    y_l = sum_{s<=l} (C_l . B_s) decay(s->l) X_s
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, l, s)
    L = torch.exp(segsum(A))  # (b, g, r, c, l, s) decay(s->l)
    y_diag = torch.einsum("bcgls,bgrcls,bcsgrp->bclgrp", CB, L, X)
    # 2. right factor (B terms): the state each chunk leaves behind, from its own inputs alone
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, g, r, c, l) decay(l->chunk end)
    states = torch.einsum("bclgn,bgrcl,bclgrp->bcgrpn", B, decay_states, X)  # (b, c, g, r, p, n)
    # 3. middle factor (A terms): the recurrence between chunks, giving the true state at every
    #    chunk boundary
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.reshape(b, 1, g, r, p, -1)
    states = torch.cat([initial_states, states], dim=1)  # (b, c + 1, g, r, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, g, r, c + 1, c + 1)
    # state entering each chunk
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay_chunk, states)[:, :-1]
    # 4. left factor (C terms): each chunk's incoming state, decayed and read out at every position
    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C, states, torch.exp(A_cumsum))
    y = (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :length]
    return y if D is None else y + x[:, :length] * (D[:, None] if D.ndim == 1 else D)


def ssd_sequential(x, dt, A, B, C, D=None, initial_states=None):
    """The same recurrence one step at a time: the reference `ssd_scan` is tested and timed
    against."""
    b, length, h, p = x.shape
    B, C = (t.repeat_interleave(h // t.shape[2], dim=2) for t in (B, C))
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    return y if D is None else y + x * (D[:, None] if D.ndim == 1 else D)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm: normalise x * silu(z) (or normalise, then gate) over groups of
    channels."""

    def __init__(
        self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None
    ):
        super().__init__()
        self.eps, self.group_size = eps, group_size or hidden_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, z=None):
        dtype = x.dtype
        work = _work_dtype(dtype)
        x = x.to(work)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(work))
        g = x.reshape(*x.shape[:-1], -1, self.group_size)
        x = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(x.shape)
        x = x * self.weight.to(work)
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.to(work))
        return x.to(dtype)


def kernels_available() -> bool:
    """True when mamba-ssm's and causal-conv1d's CUDA kernels imported and are not disabled."""
    return (
        None not in (_kernel_scan, _kernel_rmsnorm, _kernel_conv)
        and os.environ.get("QG_FORCE_TORCH_MAMBA") != "1"
    )


def _check_dims(d_ssm: int, headdim: int, ngroups: int) -> None:
    """Refuse SSM widths that do not split into whole heads, or heads into whole groups."""
    if d_ssm % headdim:
        raise ValueError(
            f"d_ssm = expand * d_model = {d_ssm} must be a multiple of "
            f"headdim = {headdim}: change d_model (token size) or headdim"
        )
    if (d_ssm // headdim) % ngroups:
        raise ValueError(f"the {d_ssm // headdim} heads must split evenly into ngroups = {ngroups}")


class Mamba2(nn.Module):
    """The Mamba-2 mixer (see the module docstring); `use_kernels=None` picks the CUDA kernels when
    it can."""

    def __init__(
        self,
        d_model,
        d_state=128,
        d_conv=4,
        conv_init=None,
        expand=2,
        headdim=64,
        d_ssm=None,
        ngroups=1,
        A_init_range=(1, 16),
        D_has_hdim=False,
        rmsnorm=True,
        norm_before_gate=False,
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        dt_limit=(0.0, float("inf")),
        bias=False,
        conv_bias=True,
        chunk_size=256,
        use_mem_eff_path=True,
        layer_idx=None,
        process_group=None,
        sequence_parallel=True,
        device=None,
        dtype=None,
        use_kernels: bool | None = None,
    ):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise NotImplementedError(
                "tensor parallelism (process_group) is not supported; use DDP"
            )
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.headdim, self.ngroups = headdim, ngroups
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        _check_dims(self.d_ssm, headdim, ngroups)
        self.nheads = self.d_ssm // headdim
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit, self.chunk_size, self.layer_idx = dt_limit, chunk_size, layer_idx
        self.use_mem_eff_path, self.use_kernels = use_mem_eff_path, use_kernels
        self._init_input(bias, conv_bias, conv_init, **factory)
        self.act = nn.SiLU()
        self._init_ssm_parameters(dt_min, dt_max, dt_init_floor, A_init_range, **factory)
        self._init_output(bias, **factory)

    def _init_input(self, bias, conv_bias, conv_init, device, dtype) -> None:
        """in_proj (to [z0, x0 | z | xBC | dt]) and the causal depthwise conv1d over xBC, its
        weights drawn uniform in +-conv_init when that is given."""
        # Order: [z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, device=device, dtype=dtype)
        conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(
            conv_dim,
            conv_dim,
            self.d_conv,
            groups=conv_dim,
            padding=self.d_conv - 1,
            bias=conv_bias,
            device=device,
            dtype=dtype,
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

    def _init_ssm_parameters(self, dt_min, dt_max, dt_init_floor, A_init_range, device, dtype):
        """dt_bias, A_log and D as mamba_ssm initialises them (same draws, same order): dt
        log-uniform in [dt_min, dt_max], floored at dt_init_floor and stored through the inverse
        softplus; A uniform in A_init_range; D ones; none of them weight-decayed."""
        dt = torch.exp(
            torch.rand(self.nheads, device=device, dtype=dtype)
            * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        )
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        if not (0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"A_init_range must be 0 < low <= high, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.D = nn.Parameter(
            torch.ones(self.d_ssm if self.D_has_hdim else self.nheads, device=device)
        )
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def _init_output(self, bias, device, dtype) -> None:
        """The grouped gated RMSNorm (when rmsnorm) and out_proj back to d_model."""
        if self.rmsnorm:
            self.norm = RMSNormGated(
                self.d_ssm,
                eps=1e-5,
                norm_before_gate=self.norm_before_gate,
                group_size=self.d_ssm // self.ngroups,
                device=device,
                dtype=dtype,
            )
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, device=device, dtype=dtype)

    def _kernels(self, u: torch.Tensor) -> bool:
        if self.use_kernels is False or not u.is_cuda:
            return False
        if self.use_kernels and not kernels_available():
            raise RuntimeError(
                "use_kernels=True but mamba-ssm / causal-conv1d kernels are not importable "
                "(pip install '.[gpu]') or QG_FORCE_TORCH_MAMBA=1 is set"
            )
        return kernels_available()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (b, l, d_model) -> (b, l, d_model): the PyTorch path below, or mamba-ssm's kernels on
        CUDA."""
        if self._kernels(u):
            return self._forward_kernels(u)
        b, length, _ = u.shape
        # (b, l, d_mlp) x 2, (b, l, d_ssm), (b, l, d_ssm + 2 g n), (b, l, h)
        z0, x0, z, xBC, dt = self._in_proj(u)
        x, B, C = self._heads(self._conv(xBC))  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
        A = -torch.exp(self.A_log.float())  # (h,) negative: every state decays
        gate = None if self.rmsnorm else z.reshape(b, length, self.nheads, self.headdim)
        y = self._torch_scan(x, dt, A, B, C, self._D(), gate).reshape(b, length, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)  # RMSNorm of y * silu(z), per group
        return self._out(z0, x0, y)

    def _forward_kernels(self, u: torch.Tensor) -> torch.Tensor:
        """The same computation through causal-conv1d's and mamba-ssm's fused CUDA kernels."""
        b, length, _ = u.shape
        z0, x0, z, xBC, dt = self._in_proj(u)
        xBC = _kernel_conv(
            xBC.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu"
        ).transpose(1, 2)
        x, B, C = self._heads(xBC)
        gate = None if self.rmsnorm else z.reshape(b, length, self.nheads, self.headdim)
        limit = {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}
        y = _kernel_scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B,
            C,
            chunk_size=self.chunk_size,
            D=self._D(),
            z=gate,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            **limit,
        ).reshape(b, length, self.d_ssm)
        if self.rmsnorm:
            y = _kernel_rmsnorm(
                y,
                self.norm.weight,
                None,
                z=z,
                eps=self.norm.eps,
                group_size=self.norm.group_size,
                norm_before_gate=self.norm_before_gate,
            )
        return self._out(z0, x0, y)

    def _in_proj(self, u: torch.Tensor) -> list[torch.Tensor]:
        """in_proj(u) split into [z0, x0 | z | xBC | dt] (z0, x0 empty unless d_ssm < d_inner)."""
        conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state  # xBC
        d_mlp = (self.in_proj.out_features - self.d_ssm - conv_dim - self.nheads) // 2
        sizes = [d_mlp, d_mlp, self.d_ssm, conv_dim, self.nheads]
        return torch.split(self.in_proj(u), sizes, -1)

    def _conv(self, xBC: torch.Tensor) -> torch.Tensor:
        """silu(causal depthwise conv in time of xBC), (b, l, c) in and out; contiguous before silu,
        whose backward on the transposed view took 12 % of a block's time."""
        conv = self.conv1d(xBC.transpose(1, 2))[..., : xBC.shape[1]]
        return self.act(conv.transpose(1, 2).contiguous())

    def _heads(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xBC (b, l, d_ssm + 2 g n) -> x per head (b, l, h, p) and B, C per group (b, l, g, n)."""
        b, length, _ = xBC.shape
        x, B, C = torch.split(
            xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], -1
        )
        return (
            x.reshape(b, length, self.nheads, self.headdim),
            B.reshape(b, length, self.ngroups, self.d_state),
            C.reshape(b, length, self.ngroups, self.d_state),
        )

    def _D(self) -> torch.Tensor:
        """The skip D x_t: one weight per head, or per channel when D_has_hdim."""
        return self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _out(self, z0: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """out_proj of [silu(z0) * x0, y]: the gated-MLP channels (if any) beside the SSM's."""
        if z0.shape[-1]:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _torch_scan(self, x, dt, A, B, C, D, gate):
        """The PyTorch path, in float32 (or float64) whatever the input dtype."""
        dtype = x.dtype
        work = _work_dtype(dtype)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work)).clamp(*self.dt_limit)
        y = ssd_scan(
            x.to(work), dt, A.to(work), B.to(work), C.to(work), self.chunk_size, D.to(work)
        )
        if gate is not None:
            y = y * F.silu(gate.to(work))
        return y.to(dtype)
