"""Exact arithmetic in Z_2^64 for GPU stages: int64 tensors whose products wrap around modulo 2^64.

CPU has exact int64 matrix products; CUDA has none. There a product is split into 16-bit limbs,
a·b = Σ_{i+j<4} (a_i·b_j)·2^{16(i+j)} mod 2^64, and each limb product runs as a float64 GEMM, which is exact
while every sum stays below 2^53 (contraction length K ≤ 2^21, which the compiler checks). The limb path runs on
any device, so it is tested on the CPU against the native one.

The product is the op `torch.ops.secure_split.ring_product` (`ring_product` here), registered once when this
module is imported. Its kernel is CompositeImplicitAutograd: made of plain tensor ops, so fake tensors, autograd
(the enclave's float64 copy of a stage) and torch.export trace through it, and an ONNX export of a stage on the
limb kernel holds the limb GEMMs themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIMB_BITS = 16  # the limb width the compiler counts `public_limbs` in (secure_split.passes.ring)
LIMBS = 64 // LIMB_BITS
_NATIVE = {"mm": torch.mm, "bmm": torch.bmm, "matmul": torch.matmul}
KERNELS = ("auto", "int64", "limbs")

torch.library.define(
    "secure_split::ring_product",
    "(str op, Tensor a, Tensor b, int public, str kernel='auto', int? public_limbs=None) -> Tensor",
)


@torch.library.impl("secure_split::ring_product", "CompositeImplicitAutograd")
def _ring_product(
    op: str, a: torch.Tensor, b: torch.Tensor, public: int, kernel: str = "auto", public_limbs: int | None = None
) -> torch.Tensor:
    """`op(a, b)` (mm, bmm or matmul) over Z_2^64; operand `public` (0 or 1) holds small public weights.

    `public_limbs` is how many signed limbs the public operand needs, fixed by the compiler (so the limb path
    reads no value to decide, and exports as a static graph); None takes all four. Floating-point operands (the
    enclave's float64 copy of a stage, used to make verification vectors) are multiplied as they are."""
    if kernel == "int64" or a.is_floating_point() or (kernel == "auto" and a.device.type == "cpu"):
        return _NATIVE[op](a, b)
    return limb_product(_NATIVE[op], a, b, public, public_limbs)


ring_product = torch.ops.secure_split.ring_product


def limb_product(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    public: int,
    public_limbs: int | None = None,
) -> torch.Tensor:
    """Bilinear `fn` over Z_2^64 from float64 limb products; the public operand uses `public_limbs` signed limbs."""
    counts = [LIMBS, LIMBS]
    counts[public] = public_limbs if public_limbs is not None else LIMBS
    la, lb = split_limbs(a, counts[0]), split_limbs(b, counts[1])
    out: torch.Tensor | None = None
    for i, ai in enumerate(la):
        for j, bj in enumerate(lb):
            if i + j >= LIMBS:
                continue  # a multiple of 2^64
            term = fn(ai, bj).to(torch.int64) * 2 ** (LIMB_BITS * (i + j))  # wraps mod 2^64
            out = term if out is None else out + term
    assert out is not None
    return out


def split_limbs(x: torch.Tensor, count: int) -> list[torch.Tensor]:
    """x = Σ x_i·2^{16i} mod 2^64: unsigned 16-bit limbs, the last one signed (so `count` < 4 fits small values)."""
    limbs = [((x >> (LIMB_BITS * i)) & 0xFFFF).to(torch.float64) for i in range(count - 1)]
    limbs.append((x >> (LIMB_BITS * (count - 1))).to(torch.float64))
    return limbs
