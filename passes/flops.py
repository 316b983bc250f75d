"""FLOP estimates per ATen node, from torch's own flop formulas where it has one."""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

# torch registers the generic flash-attention formula; the CPU variant has the same leading arguments.
_ALIASES = {aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention}


def node_flops(node: fx.Node) -> int:
    """FLOPs of one call: torch's formula for matmul/conv/attention ops, else one per output element."""
    if node.op != "call_function":
        return 0
    packet = getattr(node.target, "overloadpacket", None)
    formula = flop_registry.get(_ALIASES.get(packet, packet))
    if formula is not None:
        args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), _meta_value)
        try:
            return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
        except (TypeError, ValueError, IndexError, AttributeError):
            pass  # an argument layout the formula does not know: count it as elementwise
    return sum(_numel(v) for v in _tensors(node.meta.get("val")))


def _meta_value(arg: object) -> object:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _numel(t: torch.Tensor) -> int:
    return math.prod(int(s) for s in t.shape)


def value_bytes(node: fx.Node) -> int:
    """Bytes of the tensor(s) a node produces."""
    return sum(_numel(t) * t.element_size() for t in _tensors(node.meta.get("val")))
