"""Bit packing: b-bit unsigned codes <-> a dense uint8 stream (little-endian bit order).

Any width from 1 to 16 bits packs exactly: n codes of b bits take ceil(n*b/8) bytes, so a 3-bit
checkpoint really is 3 bits a weight, and unpack(pack(c)) == c bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch


def code_dtype(bits: int) -> torch.dtype:
    """The smallest integer type that holds b-bit codes in memory."""
    if bits <= 8:
        return torch.uint8
    if bits <= 15:
        return torch.int16
    return torch.int32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    c = codes.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if c.size and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{c.min()}, {c.max()}]")
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    as_bytes = c.astype("<u2").view(np.uint8).reshape(-1, 2)
    bitmat = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n codes, as the smallest integer type that holds them."""
    p = packed.detach().cpu().numpy().astype(np.uint8, copy=False)
    need = (n * bits + 7) // 8
    if p.size < need:
        raise ValueError(f"packed stream holds {p.size} bytes, {need} needed for {n} codes of {bits} bits "
                         "(truncated or corrupt checkpoint)")
    if bits == 8:
        return torch.from_numpy(p[:n].copy())
    bitmat = np.unpackbits(p, bitorder="little")[: n * bits].reshape(n, bits)
    full = np.zeros((n, 16), dtype=np.uint8)
    full[:, :bits] = bitmat
    vals = np.packbits(full, axis=1, bitorder="little").view("<u2").reshape(n).astype(np.int64)
    return torch.from_numpy(vals).to(code_dtype(bits))


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8
