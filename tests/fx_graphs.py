"""Small hand-made ATen graphs for the focused pass tests: a module symbolically traced, then lowered by make_fx."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from secure_split.passes.meta import PARAM_NAMES, WEIGHTS


def aten_graph(module: torch.nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """`module` on `inputs` as an ATen graph whose constants name the parameters they hold (as capture does)."""
    with torch.no_grad():
        gm = make_fx(fx.symbolic_trace(module), tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    names = {id(p): name for name, p in module.named_parameters()}
    for node in gm.graph.nodes:
        value = getattr(gm, str(node.target)) if node.op == "get_attr" else None
        if id(value) in names:
            node.meta[PARAM_NAMES] = node.meta[WEIGHTS] = (names[id(value)],)
            delattr(gm, str(node.target))
            gm.register_buffer(str(node.target), value.detach(), persistent=False)  # a constant, as capture's
    return gm


def ops(gm: fx.GraphModule, target=None) -> list[fx.Node]:
    """The call_function nodes of `gm` (those of one ATen overload, when given)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and (target is None or n.target is target)]


def op(gm: fx.GraphModule, target) -> fx.Node:
    """The one node calling `target`."""
    (node,) = ops(gm, target)
    return node


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


class Weights(torch.nn.Module):
    """Parameters `w` (4 × 4) and `v` (4), for a test's own `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))
        self.v = torch.nn.Parameter(torch.rand(4) + 1)


class Mlp(torch.nn.Module):
    """x -> relu(x·W1ᵀ + b1)·W2ᵀ + b2."""

    def __init__(self, width: int = 4, hidden: int = 8, out: int = 2) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))
