"""The Z_2^64 fixed-point ring: encoding, limits, wire dtypes, and the limb layout of its exact products.

A real x is held as round(x·2^b) with b fractional bits: activations enter the GPU with b = `frac_bits`, a
product with a weight encoded at f bits leaves with b + f bits. Decoding reads the integer as signed, so a result is
correct while its magnitude stays below 2^63; the compiler bounds that from the weights and a declared
activation bound, and `check_bound` refuses any activation beyond that bound instead of wrapping it into garbage.

Matrix products in the ring are the `torch.ops.secure_split.ring_product` op, whose kernel (native int64, or
16-bit limbs multiplied as float64 GEMMs where a device has no int64 GEMM) is the GPU side's
(`secure_split.runtime.ring_kernels`). The compiler fixes its `public_limbs` argument with `signed_limbs_needed`
and refuses contractions longer than `MAX_LIMB_CONTRACTION`, past which the limb kernel is no longer exact.
"""

from __future__ import annotations

import torch

INT64_LIMIT = 2.0**63
LIMB_BITS = 16  # the width of one limb of the ring product's `public_limbs` argument
LIMBS = 64 // LIMB_BITS
MAX_LIMB_CONTRACTION = 2**53 // 2 ** (2 * LIMB_BITS)  # K such that K·2^16·2^16 stays exact in float64


class RingOverflowError(OverflowError):
    """A value would leave the range where fixed-point arithmetic in Z_2^64 is exact."""


def encode(x: torch.Tensor | float, bits: int) -> torch.Tensor:
    """round(x·2^bits) as int64; x must fit (see `check_bound`)."""
    x = torch.as_tensor(x)
    return torch.round(x.to(torch.float64) * 2.0**bits).to(torch.int64)


def decode(y: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (y.to(torch.float64) * 2.0**-bits).to(dtype)


def check_bound(x: torch.Tensor, bound: float, name: str) -> float:
    """Refuse an activation the compiler's headroom analysis did not allow for; returns its largest |x|."""
    peak = x.abs().max().item() if x.numel() else 0.0
    if not peak <= bound:  # also catches NaN
        raise RingOverflowError(
            f"activation {name!r} reached |x| = {peak:.6g}, beyond SplitConfig.activation_bound = {bound:g}: "
            "its fixed-point encoding could overflow Z_2^64 on the GPU; raise activation_bound (the compiler "
            "re-checks the headroom) or lower frac_bits"
        )
    return peak


def wire_dtype(masking: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of `dtype` has on the wire: ring carries floating-point values as int64."""
    return torch.int64 if masking == "ring" and dtype.is_floating_point else dtype


def signed_limbs_needed(x: torch.Tensor) -> int:
    """How many limbs (unsigned low ones, a signed top one) represent every value of x exactly."""
    if x.numel() == 0:
        return 1
    top = int(torch.maximum(x.max(), -x.min() - 1).item())
    bits = top.bit_length() + 1  # with the sign
    return min(LIMBS, max(1, -(-bits // LIMB_BITS)))


def ring_product_op() -> torch._ops.OpOverloadPacket:
    """`torch.ops.secure_split.ring_product`, which `secure_split.runtime.ring_kernels` registers with its kernel
    (the compiler pipeline, `secure_split.compile`, imports it before any pass runs)."""
    try:
        return torch.ops.secure_split.ring_product
    except AttributeError as err:
        raise RuntimeError(
            "torch.ops.secure_split.ring_product is not registered: import secure_split.runtime.ring_kernels "
            "(secure_split.compile does) before lowering to the ring"
        ) from err
