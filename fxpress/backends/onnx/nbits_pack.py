"""MatMulNBits' storage: signed int4/int8 values and zero points packed the way ORT reads them."""
from __future__ import annotations

import numpy as np

__all__ = ["pack_nbits", "pack_zero_points", "unpack_nbits"]


def pack_nbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed values q [N, K] (int4 in [-8, 7] or int8) -> MatMulNBits B [N, K/block, block*bits/8].

    >>> pack_nbits(np.array([[1, -2] * 8], np.int8), 4, 16)[0, 0, 0]    # 9 | (6 << 4)
    105
    """
    n, k = q.shape
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return u.reshape(n, k // block, block)
    u = u.reshape(n, k // block, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)


def unpack_nbits(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of pack_nbits: B [N, nb, blob] -> signed values [N, K]."""
    n = b.shape[0]
    if bits == 8:
        u = b.reshape(n, -1)
    else:
        u = np.stack([b & 0x0F, b >> 4], -1).reshape(n, -1)
    return (u[:, :k].astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """Signed zero points [N, nb] -> MatMulNBits' uint8 [N * ceil(nb * bits / 8)]."""
    u = (zp.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return u.reshape(-1)
    n, nb = u.shape
    if nb % 2:
        u = np.concatenate([u, np.full((n, 1), 8, np.uint8)], 1)
    u = u.reshape(n, -1, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8).reshape(-1)
