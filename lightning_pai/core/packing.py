"""Bit-packing of boolean masks: one bit per weight instead of one byte.

Format (what :func:`pack_mask` writes and :func:`unpack_mask` reads): the mask is flattened in row-major
(C) order into bits ``b_0, b_1, ..., b_{n-1}`` and stored as ``ceil(n / 8)`` ``uint8`` bytes with
**little-endian bit order**: byte ``j`` holds ``b_{8j + i}`` at bit ``i`` (value ``2**i``), i.e.
``byte_j = sum_i b_{8j+i} * 2**i``. The unused high bits of the last byte are zero. This is NumPy's
``np.packbits(mask.ravel(), bitorder="little")``. The shape is not stored; keep it beside the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: ``2**i`` for the eight bit positions of a byte, little-endian (bit 0 is the first weight).
_BIT_VALUES = tuple(1 << i for i in range(8))


def packed_size(numel: int) -> int:
    """Number of bytes :func:`pack_mask` uses for ``numel`` weights: ``ceil(numel / 8)``."""
    return (int(numel) + 7) // 8


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a boolean mask of any shape into bits (1/8 byte per weight).

    Implements ``byte_j = sum_{i<8} mask.flatten()[8j + i] * 2**i`` (little-endian bit order, row-major
    weight order, zero padding in the last byte); see the module docstring.

    Args:
        mask: Bool tensor of any shape (0-d and empty included), on any device.

    Returns:
        1-D ``uint8`` tensor of ``ceil(mask.numel() / 8)`` bytes, on ``mask``'s device.

    Raises:
        TypeError: If ``mask`` is not a bool tensor.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"`mask` must be a bool tensor, got {type(mask).__name__} of dtype {getattr(mask, 'dtype', None)}."
        )
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(torch.uint8).view(-1, 8)
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)  # distinct powers of two: the sum is a bitwise OR


def unpack_mask(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_mask`: bytes (little-endian bit order) back to a bool mask of ``shape``.

    Implements ``mask.flatten()[8j + i] = (packed[j] >> i) & 1``, reshaped row-major to ``shape``.

    Args:
        packed: 1-D ``uint8`` tensor as returned by :func:`pack_mask`.
        shape: Shape of the original mask (``()`` for a 0-d mask).

    Returns:
        Bool tensor of ``shape`` on ``packed``'s device.

    Raises:
        TypeError: If ``packed`` is not a ``uint8`` tensor.
        ValueError: If ``packed`` is not 1-D or its length is not ``ceil(prod(shape) / 8)``.
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"`packed` must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}.")
    shape = torch.Size(shape)
    if packed.dim() != 1 or packed.numel() != packed_size(shape.numel()):
        raise ValueError(
            f"`packed` must be 1-D with ceil({shape.numel()} / 8) = {packed_size(shape.numel())} bytes for shape "
            f"{tuple(shape)}, got shape {tuple(packed.shape)}."
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[: shape.numel()].to(torch.bool).reshape(shape)
