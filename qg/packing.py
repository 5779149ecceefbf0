"""N-bit integer codes packed into bytes: what makes a 3-bit file 3/8 the size of an 8-bit one.

A weight's codes q (signed, in [-2^(N-1), 2^(N-1) - 1], the range every scheme of `qg.quant` uses) are
shifted to unsigned u = q + 2^(N-1) in [0, 2^N - 1], written row-major as one little-endian bit stream of N
bits per code (bit j of code i is bit i*N + j of the stream) and cut into bytes, the last byte zero-padded:

    4 bits:  two codes per byte          u0 | u1 << 4
    3 bits:  eight codes in three bytes  u0 | u1 << 3 | (u2 & 0b11) << 6,  then u2 >> 2 | u3 << 1 | ...
    8 bits:  one code per byte           u0

The layout does not depend on granularity or group size, so a row length that is not a multiple of a group
(or of 8 codes) needs nothing special: the stream simply ends mid-byte.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take packed: ceil(numel * bits / 8)."""
    return math.ceil(numel * bits / 8)


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes of any shape -> a 1-D uint8 tensor of `packed_nbytes(codes.numel(), bits)` bytes."""
    u = codes.reshape(-1).to(torch.int16) + 2 ** (bits - 1)
    if u.numel() and not (0 <= int(u.min()) and int(u.max()) < 2**bits):
        raise ValueError(f"codes outside the {bits}-bit range -{2 ** (bits - 1)}..{2 ** (bits - 1) - 1}")
    stream = (u.to(torch.uint8).unsqueeze(-1) >> _positions(bits)) & 1  # (numel, bits): each code's bits, lowest first
    stream = torch.cat([stream.reshape(-1), stream.new_zeros(-stream.numel() % 8)])
    return (stream.reshape(-1, 8) << _positions(8)).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """The inverse of `pack_codes`: int8 codes of `shape`. A byte count that does not match is a ValueError."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"a packed {bits}-bit tensor of shape {tuple(shape)} is {packed_nbytes(numel, bits)} uint8 "
                         f"bytes, got {packed.numel()} {str(packed.dtype).removeprefix('torch.')} values")
    stream = (packed.unsqueeze(-1) >> _positions(8)) & 1
    u = (stream.reshape(-1)[: numel * bits].reshape(numel, bits) << _positions(bits)).sum(-1, dtype=torch.int16)
    return (u - 2 ** (bits - 1)).to(torch.int8).reshape(shape)
