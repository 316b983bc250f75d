"""Ring lowering: rewrite a GPU stage from floating point into exact fixed-point arithmetic over Z_2^64.

Every masked stage input arrives as round(x·2^f) (f fractional bits). A public factor is encoded with the
fewest fractional bits that hold it exactly, at most f (0 for integers, 1 for 0.5), so a product carries the
sum of its operands' bits; sums first align their operands to the larger count by exact multiplications by
powers of two; added constants are encoded with their partner's bits. Matrix products become
`torch.ops.secure_split.ring_product` calls (native int64 on the CPU, float64 limbs on CUDA). The stage
then stays affine over Z_2^64, so f(x + r) - (f(r) - f(0)) = f(x) holds bit for bit.

Alongside, the pass bounds every integer from the weights and the declared activation bound and refuses, at
compile time, a stage whose worst case reaches 2^63. The outputs' fractional bits, bounds and shapes go in
`gm.meta`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .infra import require, require_meta
from .label import GPU, MASKABLE_DTYPES, SHAPE_OPS, packet, producer
from .meta import REASON, RING_BITS, RING_BOUNDS, RING_SHAPES, SIDE, TAINT
from .ring import INT64_LIMIT, MAX_LIMB_CONTRACTION, RingOverflowError, encode, ring_product_op, signed_limbs_needed
from .taint import PRIVATE

aten = torch.ops.aten
_LINEAR_VIEWS = SHAPE_OPS - {aten.neg, aten.sum, aten.mean}
_PRODUCTS = {aten.mm: "mm", aten.bmm: "bmm", aten.matmul: "matmul", aten.addmm: "mm", aten.baddbmm: "bmm"}


@dataclass(frozen=True)
class Fixed:
    """A masked integer value: real = int / 2^bits; |int| ≤ bound for inputs within the activation bound."""

    bits: int
    bound: float


class RingLowerPass(PassBase):
    """Rebuilds one GPU stage GraphModule over int64; raises `RingOverflowError` when headroom is too small."""

    def __init__(self, frac_bits: int, activation_bound: float, kernel: str = "auto") -> None:
        super().__init__()
        self.frac_bits = frac_bits
        self.activation_bound = activation_bound
        self.kernel = kernel

    def requires(self, graph_module: fx.GraphModule) -> None:
        """One stage's graph (not the boundary graph), traced: every input and op has its value's metadata."""
        nodes = graph_module.graph.nodes
        require(self, not any(n.op == "call_module" for n in nodes), "needs a stage graph, not a boundary graph")
        require_meta(self, [n for n in nodes if n.op in ("placeholder", "call_function")], "val", "needs traced values")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        lowering = _Lowering(graph_module, self.frac_bits, self.activation_bound, self.kernel)
        for node in graph_module.graph.nodes:
            lowering.visit(node)
        lowered = fx.GraphModule(lowering.holder, lowering.graph, graph_module.__class__.__name__)
        lowered.meta[RING_BITS] = lowering.out_bits
        lowered.meta[RING_BOUNDS] = lowering.out_bounds
        lowered.meta[RING_SHAPES] = lowering.out_shapes
        return PassResult(lowered, True)


class RingHeadroom:
    """A labelling rule for ring masking: a GPU node that could overflow Z_2^64, or that ring arithmetic cannot
    express, stays in the enclave (and the report says why). E.g. RoPE's multiplication by public cos/sin
    tables after a projection triples the fractional bits; in the enclave it costs no extra crossing."""

    def __init__(self, frac_bits: int, activation_bound: float) -> None:
        self.frac_bits = frac_bits
        self.activation_bound = activation_bound

    def __call__(self, nodes: list[fx.Node]) -> bool:
        """Demote what does not fit under the current labels; True when a label changed."""
        if not nodes:
            return False
        gm = nodes[0].graph.owning_module
        sim = _Lowering(gm, self.frac_bits, self.activation_bound, "int64")
        changed = False
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                sim.visit(node)
            elif node.op == "call_function" and producer(node).meta[SIDE] == GPU and node.meta[TAINT] == PRIVATE:
                changed |= self._simulate(sim, node)
        return changed

    def _simulate(self, sim: _Lowering, node: fx.Node) -> bool:
        try:
            for arg in node.all_input_nodes:
                if arg not in sim.fact and arg not in sim.const:
                    sim.admit(arg)
            sim.visit(node)
        except RingOverflowError:
            reason = "ring masking: its fixed-point values could overflow Z_2^64 on the GPU (headroom)"
        except NotImplementedError as err:
            reason = str(err)
        else:
            return False
        node.meta[SIDE], node.meta[REASON] = "enclave", reason
        return True


class _Lowering:
    """State of one rewrite: the new graph, and what each old node became (a Fixed value or a constant)."""

    def __init__(self, gm: fx.GraphModule, frac_bits: int, activation_bound: float, kernel: str) -> None:
        self.gm, self.f, self.activation_bound, self.kernel = gm, frac_bits, activation_bound, kernel
        self.graph = fx.Graph()
        self.holder = torch.nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.fact: dict[fx.Node, Fixed] = {}
        self.const: dict[fx.Node, torch.Tensor] = {}
        self.out_bits: list[int] = []
        self.out_bounds: list[float] = []
        self.out_shapes: list[tuple[int, ...]] = []

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.admit(node)
        elif node.op == "get_attr":
            self.const[node] = getattr(self.gm, str(node.target))
        elif node.op == "output":
            outs = node.args[0]
            self.out_bits = [self.fact[o].bits for o in outs]
            self.out_bounds = [self.fact[o].bound for o in outs]
            self.out_shapes = [tuple(o.meta["val"].shape) for o in outs]
            self.graph.output(tuple(self.env[o] for o in outs))
        else:
            self._lower(node)

    def admit(self, node: fx.Node) -> None:
        """`node`'s value enters the stage from the enclave: freshly encoded, within the activation bound."""
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype not in MASKABLE_DTYPES:
            raise NotImplementedError(f"ring masking: GPU stage input {node.name} is not floating point")
        self.env[node] = self.graph.placeholder(node.name)
        self._set(node, Fixed(self.f, self.activation_bound * 2.0**self.f))

    def _lower(self, node: fx.Node) -> None:
        op = packet(node)
        if node.target is operator.getitem or op in _LINEAR_VIEWS or op is aten.neg:
            self._copy(node, self.fact[node.args[0]])
        elif op is aten.sum:
            self._sum(node)
        elif op is aten.mean:
            self._mean(node)
        elif op in (aten.mul, aten.div):
            self._scale(node, op)
        elif op in (aten.add, aten.sub):
            self._add(node, op)
        elif op in (aten.cat, aten.stack):
            self._cat(node)
        elif op in _PRODUCTS or op is aten.linear:
            self._product(node, op)
        else:
            raise NotImplementedError(
                f"ring masking cannot lower {node.target} ({node.name}) on the GPU; use masking='float' for this model"
            )

    # -- emitting -------------------------------------------------------------------------------------------

    def _set(self, node: fx.Node, fact: Fixed) -> None:
        if not fact.bound < INT64_LIMIT:
            raise RingOverflowError(
                f"{node.name} ({node.target}) may reach |value| = 2^{math.log2(fact.bound):.1f} in Z_2^64 (limit 2^63) "
                f"with frac_bits={self.f} and activation_bound={self.activation_bound:g}; lower one of them"
            )
        self.fact[node] = fact

    def _emit(self, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(target, args, kwargs or {})

    def _copy(self, node: fx.Node, fact: Fixed) -> None:
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        self.env[node] = self._emit(node.target, fx.node.map_arg(node.args, self.env.__getitem__), kwargs)
        self._set(node, fact)

    def _constant(self, value: torch.Tensor | float, bits: int) -> fx.Node | int:
        """An encoded public constant: a python int for scalars, else a new int64 buffer."""
        encoded = encode(value, bits)
        if encoded.dim() == 0 and not isinstance(value, torch.Tensor):
            return int(encoded)
        name = f"ring_const{len(list(self.holder.buffers()))}"
        self.holder.register_buffer(name, encoded, persistent=False)
        return self.graph.get_attr(name)

    def _value(self, arg: fx.Node | float) -> torch.Tensor | float:
        """A public operand: a constant's tensor, or a python scalar as is."""
        return self.const[arg] if isinstance(arg, fx.Node) else arg

    def _operand(self, arg: fx.Node | float, bits: int) -> tuple[fx.Node | int, float]:
        """A summand with `bits` fractional bits, and its bound: masked values are lifted (exactly, by 2^Δ)."""
        if arg not in self.fact:
            return self._public_term(self._value(arg), bits)
        gap = bits - self.fact[arg].bits
        lifted = self.env[arg] if gap == 0 else self._emit(aten.mul.Tensor, (self.env[arg], 2**gap))
        return lifted, self.fact[arg].bound * 2.0**gap

    def _public_term(self, value: torch.Tensor | float, bits: int) -> tuple[fx.Node | int, float]:
        """A public constant added to a value with `bits` fractional bits, and its bound."""
        magnitude = torch.as_tensor(value).abs()
        return self._constant(value, bits), float(magnitude.max() if magnitude.numel() else 0.0) * 2.0**bits

    # -- rules ----------------------------------------------------------------------------------------------

    def _sum(self, node: fx.Node) -> None:
        x = node.args[0]
        self._copy(node, Fixed(self.fact[x].bits, self.fact[x].bound * _summands(node)))

    def _mean(self, node: fx.Node) -> None:
        x, count = node.args[0], _summands(node)
        total = self._emit(aten.sum.dim_IntList, fx.node.map_arg(node.args, self.env.__getitem__), dict(node.kwargs))
        bits = _exact_bits(1.0 / count, self.f)
        inverse = self._constant(1.0 / count, bits)
        self.env[node] = self._emit(aten.mul.Tensor, (total, inverse))
        self._set(node, Fixed(self.fact[x].bits + bits, self.fact[x].bound * abs(inverse)))

    def _scale(self, node: fx.Node, op) -> None:
        x, other = node.args[0], node.args[1]
        if x not in self.fact:
            x, other = other, x  # mul is symmetric; div's divisor is never the masked value (label pass)
        value = self._value(other)
        if op is aten.div:
            value = 1.0 / value
        bits = _exact_bits(value, self.f)
        factor = self._constant(value, bits)
        peak = abs(factor) if isinstance(factor, int) else float(getattr(self.holder, factor.target).abs().max())
        self.env[node] = self._emit(aten.mul.Tensor, (self.env[x], factor))
        self._set(node, Fixed(self.fact[x].bits + bits, self.fact[x].bound * peak))

    def _add(self, node: fx.Node, op) -> None:
        alpha = node.kwargs.get("alpha", 1)
        if alpha != int(alpha):
            raise NotImplementedError(f"ring masking: {node.name} adds with non-integer alpha={alpha}")
        a, b = node.args[0], node.args[1]
        bits = max(self.fact[v].bits for v in (a, b) if v in self.fact)
        args, bounds = zip(*(self._operand(v, bits) for v in (a, b)), strict=True)
        kwargs = {"alpha": int(alpha)} if alpha != 1 else {}
        self.env[node] = self._emit(node.target, tuple(args), kwargs)
        self._set(node, Fixed(bits, bounds[0] + abs(int(alpha)) * bounds[1]))

    def _cat(self, node: fx.Node) -> None:
        parts = node.args[0]
        bits = max(self.fact[p].bits for p in parts if p in self.fact)
        lowered = [self._operand(p, bits) for p in parts]
        self.env[node] = self._emit(node.target, ([n for n, _ in lowered], *node.args[1:]), dict(node.kwargs))
        self._set(node, Fixed(bits, max(b for _, b in lowered)))

    def _product(self, node: fx.Node, op) -> None:
        if op in (aten.addmm, aten.baddbmm):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                raise NotImplementedError(f"ring masking: {node.name} with beta/alpha other than 1")
            added, a, b = node.args[:3]
        else:
            (a, b), added = node.args[:2], (node.args[2] if op is aten.linear and len(node.args) > 2 else None)
        public = 1 if a in self.fact else 0
        x, w = (a, b) if public == 1 else (b, a)
        weight_value = self.const[w].t() if op is aten.linear else self.const[w]
        bits = _exact_bits(weight_value, self.f)
        weight = self._constant(weight_value, bits)
        contraction = weight_value.shape[-2] if public == 1 else weight_value.shape[-1]
        if contraction > MAX_LIMB_CONTRACTION:
            raise NotImplementedError(f"ring masking: {node.name} contracts {contraction} > 2^21 terms")
        operands = (self.env[x], weight) if public == 1 else (weight, self.env[x])
        kind = "matmul" if op is aten.linear else _PRODUCTS[op]
        limbs = signed_limbs_needed(encode(weight_value, bits))
        out = self._emit(ring_product_op(), (kind, *operands, public, self.kernel, limbs))
        out_bits = self.fact[x].bits + bits
        gain = float(encode(weight_value, bits).abs().sum(dim=-2 if public == 1 else -1).max())
        bound = self.fact[x].bound * gain
        if added is not None:
            bias, bias_bound = self._public_term(self.const[added], out_bits)
            out = self._emit(aten.add.Tensor, (out, bias))
            bound += bias_bound
        self.env[node] = out
        self._set(node, Fixed(out_bits, bound))


def _summands(node: fx.Node) -> int:
    """How many input elements a reduction adds into each output element."""
    return node.args[0].meta["val"].numel() // max(1, node.meta["val"].numel())


def _exact_bits(value: torch.Tensor | float, frac_bits: int) -> int:
    """The fewest fractional bits (at most `frac_bits`) that encode `value` exactly: 0 for integers, 1 for 0.5."""
    t = torch.as_tensor(value, dtype=torch.float64)
    for bits in range(frac_bits):
        scaled = t * 2.0**bits
        if bool((scaled == torch.round(scaled)).all()):
            return bits
    return frac_bits
