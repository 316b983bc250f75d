"""Freivalds-style checks of GPU results under ring masking (`SplitConfig.verify=True`).

A ring GPU stage is affine over Z_2^64: Y = L(X) + c. For secret random weights s on the outputs, a correct
answer satisfies  Σ<s, Y> = Σ<Lᵀs, X> + <s, c>  (mod 2^64), which costs the enclave a few dot products per
call; Lᵀs and <s, c> are computed offline, in the pool, by float64 autograd through the stage (exact: the
compiler sizes s so that every cotangent stays below 2^53).

Soundness. Let a wrong answer differ by E ≠ 0. The enclave also checks every unmasked result against the
compile-time bound B of its stage output, so a wrong answer that passes has |E| ≤ 2B and each nonzero
entry of E has at most v = ⌊log2 2B⌋ trailing zero bits. With s uniform on [0, 2^w), one check passes with
probability at most 2^-min(w, 64-v); `reps` independent checks bring it to 2^-(reps·min(w, 64-v)). The
program asks each of its S stages for 40 + ⌈log2 S⌉ bits, so a call (S checked stages) errs with probability
at most 2^-40 by the union bound.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from secure_split.passes.meta import RING_BOUNDS, RING_SHAPES

from .csprng import CSPRNG

CALL_SOUNDNESS_BITS = 40
_EXACT = 2.0**53
aten = torch.ops.aten


class IntegrityError(RuntimeError):
    """A GPU result failed verification: the GPU (or the link) returned a wrong answer."""


@dataclass(frozen=True)
class CheckPlan:
    """How one GPU stage is checked: weight width w, repetitions, and the soundness this buys."""

    width: int
    reps: int
    soundness_bits: int  # a wrong answer passes with probability ≤ 2^-soundness_bits

    @classmethod
    def for_bounds(cls, width: int, reps: int, out_bounds: list[int]) -> CheckPlan:
        """`reps` checks of width w on outputs bounded by `out_bounds`: sound to reps·min(w, 64 - v) bits."""
        return cls(width, reps, reps * min(width, 64 - _trailing_bits(out_bounds)))


def required_bits(checked_stages: int) -> int:
    """The soundness each of a call's checked stages needs for the call to err with probability ≤ 2^-40."""
    return CALL_SOUNDNESS_BITS + math.ceil(math.log2(max(1, checked_stages)))


def _trailing_bits(out_bounds: list[int]) -> int:
    """v: the most trailing zero bits a nonzero error |E| ≤ 2B can have, B the largest output bound."""
    return math.floor(math.log2(2 * max(out_bounds)))


class StageVerifier:
    """Makes a stage's offline check vectors and checks its answers online.

    `transpose(*s)` returns u = Lᵀs for weights s on the outputs (float64, exact); `out_bounds` bound the
    unmasked outputs. `for_stage` builds one from an fx stage; a bundle keeps `transpose` as an ONNX file."""

    def __init__(
        self,
        name: str,
        transpose: Callable[..., tuple[torch.Tensor, ...]],
        plan: CheckPlan,
        out_bounds: list[int],
        out_shapes: list[tuple[int, ...]],
        inputs_like: list[torch.Tensor],
    ) -> None:
        self.name = name
        self.transpose = transpose
        self.plan = plan
        self.out_bounds = out_bounds
        self.out_shapes = out_shapes
        self.inputs_like = inputs_like  # in the layouts the stage was traced with

    @classmethod
    def for_stage(
        cls, stage: fx.GraphModule, inputs_like: list[torch.Tensor], name: str, target_bits: int
    ) -> StageVerifier:
        """Plan the checks of a ring GPU stage (at least `target_bits` of soundness) and trace its transpose."""
        out_bounds, out_shapes = stage.meta[RING_BOUNDS], stage.meta[RING_SHAPES]
        cotangent_peak = _cotangent_peak(_float64_copy(stage, absolute=True), inputs_like)
        width = min(math.floor(math.log2(_EXACT / max(cotangent_peak, 1.0))) - 1, 64 - _trailing_bits(out_bounds), 62)
        if width < 1:
            raise ValueError(f"verify=True cannot check {name}: its cotangents exceed float64's exact range")
        reps = math.ceil(target_bits / width)
        transpose = transpose_graph(_float64_copy(stage, absolute=False), inputs_like, out_shapes)
        return cls(name, transpose, CheckPlan.for_bounds(width, reps, out_bounds), out_bounds, out_shapes, inputs_like)

    @property
    def nbytes_per_call(self) -> int:
        """Pool memory of one call's checks: s per output, u per input, and <s, c>, for every repetition."""
        outputs = sum(math.prod(shape) for shape in self.out_shapes)
        inputs = sum(x.numel() for x in self.inputs_like)
        return self.plan.reps * (outputs + inputs + 1) * 8

    def make_checks(self, rng: CSPRNG, f0: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
        """`reps` tuples (s_1..s_K, u_1..u_J, <s, c>) with u = Lᵀs: the secret half of each check."""
        checks = []
        for _ in range(self.plan.reps):
            ss = [rng.integers(tuple(c.shape)) & (2**self.plan.width - 1) for c in f0]
            us = [u.to(torch.int64) for u in self.transpose(*[s.to(torch.float64) for s in ss])]
            sc = sum((s * c).sum() for s, c in zip(ss, f0, strict=True))
            checks.append((*ss, *us, torch.as_tensor(sc)))
        return checks

    def check(self, checks: list[tuple[torch.Tensor, ...]], sent: list[torch.Tensor], got: list[torch.Tensor]) -> None:
        """Raise `IntegrityError` unless Σ<s, Y> = Σ<u, X> + <s, c> (mod 2^64) for every repetition."""
        k = len(got)
        for rep in checks:
            ss, us, sc = rep[:k], rep[k:-1], rep[-1]
            lhs = sum((s * y).sum() for s, y in zip(ss, got, strict=True))
            rhs = sum((u * x).sum() for u, x in zip(us, sent, strict=True)) + sc
            if not torch.equal(torch.as_tensor(lhs), torch.as_tensor(rhs)):
                raise IntegrityError(f"{self.name}: the GPU's result failed the Freivalds check")

    def check_range(self, index: int, value: torch.Tensor) -> None:
        """An unmasked result beyond its compile-time bound cannot be right."""
        bound = int(self.out_bounds[index])
        if not bool(((value >= -bound) & (value <= bound)).all()):
            raise IntegrityError(f"{self.name}: output {index} is outside its proven range: the GPU answered wrong")


def _float64_copy(stage: fx.GraphModule, absolute: bool) -> fx.GraphModule:
    """The stage over float64 (autograd works there); `absolute` makes every coefficient non-negative."""
    copied = copy.deepcopy(stage)
    for name, buffer in list(copied.named_buffers()):
        value = buffer.to(torch.float64)
        copied.register_buffer(name, value.abs() if absolute else value, persistent=False)
    if absolute:
        for node in copied.graph.nodes:
            if node.target is aten.neg.default:
                node.target = aten.clone.default
            elif node.target is aten.sub.Tensor:
                node.target = aten.add.Tensor
            if node.target in (aten.mul.Tensor, aten.add.Tensor):  # scalar coefficients (other args are dims)
                node.args = tuple(abs(a) if _is_number(a) else a for a in node.args)
                node.kwargs = {k: abs(v) if _is_number(v) else v for k, v in node.kwargs.items()}
        copied.recompile()
    return copied


def _is_number(arg: object) -> bool:
    return isinstance(arg, int | float) and not isinstance(arg, bool)


def transpose_graph(
    linear: fx.GraphModule, inputs_like: list[torch.Tensor], out_shapes: list[tuple[int, ...]]
) -> fx.GraphModule:
    """s -> Lᵀs of a float64 linear stage, as a graph of plain tensor ops (autograd's backward pass, traced)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def transpose(*ss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            xs = _float64_inputs(inputs_like)
            us = torch.autograd.grad(linear(*xs), xs, list(ss), allow_unused=True)
        return tuple(torch.zeros_like(x) if u is None else u for u, x in zip(us, xs, strict=True))

    return make_fx(transpose)(*[torch.zeros(tuple(shape), dtype=torch.float64) for shape in out_shapes])


def _float64_inputs(inputs_like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x, dtype=torch.float64).requires_grad_() for x in inputs_like]


def _cotangent_peak(absolute: fx.GraphModule, inputs_like: list[torch.Tensor]) -> float:
    """The largest cotangent anywhere in a backward pass of all-ones, through non-negative coefficients."""
    xs = _float64_inputs(inputs_like)
    peaks = [0.0]

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g: peaks.append(float(g.abs().max())) if g.numel() else None)
            return out

    with torch.enable_grad():
        ys = Recorder(absolute).run(*xs)
        torch.autograd.grad(ys, xs, [torch.ones_like(y) for y in ys], allow_unused=True)
    return max(peaks)
