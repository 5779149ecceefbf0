"""N-bit integer codes packed into bytes: what makes a 3-bit file 3/8 the size of an 8-bit one.

A weight's codes q (signed, in [-2^(N-1), 2^(N-1) - 1], the range every scheme of `qg.quant` uses)
are shifted to unsigned u = q + 2^(N-1) in [0, 2^N - 1], written row-major as one little-endian bit
stream of N bits per code (bit j of code i is bit i*N + j of the stream) and cut into bytes, the
last byte zero-padded (so a tensor costs ceil(numel * N / 8) bytes: at most one byte of padding):

    4 bits:  two codes per byte          u0 | u1 << 4
    3 bits:  eight codes in three bytes  u0 | u1 << 3 | (u2 & 0b11) << 6,
                                         then u2 >> 2 | u3 << 1 | ...
    8 bits:  one code per byte           u0

The layout does not depend on granularity or group size, so a row length that is not a multiple of a
group (or of 8 codes) needs nothing special: the stream simply ends mid-byte.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take packed: ceil(numel * bits / 8)."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes of any shape -> a 1-D uint8 tensor of `packed_nbytes(codes.numel(), bits)`
    bytes.

    Eight codes of N bits are exactly N bytes: each run of eight codes is combined into one 64-bit
    word (code j at bit N*j) and the word is cut into its N low bytes."""
    u = codes.reshape(-1).to(torch.int64) + 2 ** (bits - 1)
    if u.numel() and not (0 <= int(u.min()) and int(u.max()) < 2**bits):
        raise ValueError(
            f"codes outside the {bits}-bit range -{2 ** (bits - 1)}..{2 ** (bits - 1) - 1}"
        )
    if bits == 8:
        return u.to(torch.uint8)
    runs = torch.cat([u, u.new_zeros(-len(u) % 8)]).reshape(-1, 8)
    words = (runs << (bits * torch.arange(8, device=u.device))).sum(-1)
    packed = (words.unsqueeze(-1) >> (8 * torch.arange(bits, device=u.device))) & 0xFF
    return packed.reshape(-1)[: packed_nbytes(len(u), bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """The inverse of `pack_codes`: int8 codes of `shape`. A byte count that does not match is a
    ValueError."""
    numel = math.prod(shape)
    if (
        packed.dtype != torch.uint8
        or packed.ndim != 1
        or packed.numel() != packed_nbytes(numel, bits)
    ):
        raise ValueError(
            f"a packed {bits}-bit tensor of shape {tuple(shape)} is "
            f"{packed_nbytes(numel, bits)} uint8 bytes, got {packed.numel()} "
            f"{str(packed.dtype).removeprefix('torch.')} values"
        )
    if bits == 8:
        return (packed.to(torch.int16) - 128).to(torch.int8).reshape(shape)
    runs = -(-numel // 8)
    whole = (
        torch.cat([packed, packed.new_zeros(runs * bits - len(packed))])
        .reshape(runs, bits)
        .to(torch.int64)
    )
    # N bytes: at most 56 bits
    words = (whole << (8 * torch.arange(bits, device=packed.device))).sum(-1)
    codes = torch.empty(runs, 8, dtype=torch.int8, device=packed.device)
    for j in range(8):  # one position of every run at a time: transient memory of numel / 8 words
        codes[:, j] = (((words >> (bits * j)) & (2**bits - 1)) - 2 ** (bits - 1)).to(torch.int8)
    return codes.reshape(-1)[:numel].reshape(shape)
