"""Stage building: cut a labelled graph into an ordered list of enclave and GPU stages.

Stages alternate sides, enclave first (the user's data arrives in the enclave): stage 0, 2, 4... run in the
enclave and 1, 3, 5... on the GPU. Each node goes to the earliest stage of its side that comes after every
stage it depends on (an as-soon-as-possible schedule), so a GPU stage gathers all the offloadable work that is
ready at once, e.g. the Q, K and V projections of one layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from secure_split.passes.flops import node_flops
from secure_split.passes.label import ENCLAVE, GPU
from secure_split.passes.meta import SIDE, STAGE, TAINT


@dataclass(frozen=True)
class StageSpec:
    """One stage: its side, the submodule name in the boundary graph, and what it reads and produces."""

    index: int
    side: str
    module_name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_nodes: int
    flops: int


@dataclass
class PartitionResult:
    """The labelled ATen graph, and the boundary graph that calls one submodule per stage in order."""

    labelled: fx.GraphModule
    boundary: fx.GraphModule
    stages: list[StageSpec]

    def stage_module(self, spec: StageSpec) -> fx.GraphModule:
        return self.boundary.get_submodule(spec.module_name)


def assign_stages(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Earliest stage of its own side after all its inputs (even stages: enclave, odd: GPU)."""
    stage: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        side = node.meta[SIDE]
        earliest = 0 if side == ENCLAVE else 1
        for inp in node.all_input_nodes:
            if inp in stage:
                earliest = max(earliest, stage[inp] + (inp.meta[SIDE] != side))
        if (earliest % 2 == 1) != (side == GPU):
            earliest += 1
        stage[node] = earliest
        node.meta[STAGE] = earliest
    return stage


def build_partition(gm: fx.GraphModule) -> PartitionResult:
    """Build one GraphModule per non-empty stage and a boundary graph calling them in order."""
    stage_of = assign_stages(gm)
    order = sorted({s for n, s in stage_of.items() if n.op == "call_function"})
    boundary = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = boundary.placeholder(node.name)
            env[node].meta.update(node.meta)
    specs = []
    for index in order:
        members = [n for n in gm.graph.nodes if stage_of.get(n) == index and n.op == "call_function"]
        module, inputs, outputs = _extract(gm, members)
        side = members[0].meta[SIDE]
        name = f"stage{index}_{side}"
        root.add_module(name, module)
        call = boundary.call_module(name, tuple(env[i] for i in inputs))
        call.meta[SIDE] = side
        call.meta[STAGE] = index
        for k, out in enumerate(outputs):
            env[out] = boundary.call_function(operator.getitem, (call, k))
            env[out].name = out.name
            env[out].meta.update({key: out.meta[key] for key in ("val", TAINT) if key in out.meta})
            env[out].meta[SIDE] = side
        specs.append(
            StageSpec(index, side, name, tuple(i.name for i in inputs), tuple(o.name for o in outputs),
                      len(members), sum(node_flops(n) for n in members))
        )  # fmt: skip
    for node in gm.graph.nodes:
        if node.op == "get_attr" and any(u.op == "output" for u in node.users):  # a constant the model returns
            _share_attr(gm, root, str(node.target))
            env[node] = boundary.get_attr(str(node.target))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    boundary.output(fx.node.map_arg(output.args[0], lambda n: env[n]))
    return PartitionResult(gm, fx.GraphModule(root, boundary, "SplitBoundary"), specs)


def _extract(gm: fx.GraphModule, members: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """Copy `members` into their own graph; outside values become placeholders, constants are shared."""
    graph = fx.Graph()
    holder = torch.nn.Module()
    member_set = set(members)
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:
            if arg.op == "get_attr":
                _share_attr(gm, holder, str(arg.target))
                env[arg] = graph.get_attr(str(arg.target))
            else:
                env[arg] = graph.placeholder(arg.name)
                inputs.append(arg)
            env[arg].meta.update(arg.meta)
        return env[arg]

    for node in members:
        env[node] = graph.node_copy(node, lookup)
    outputs = [n for n in members if any(u not in member_set for u in n.users)]
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(holder, graph, "Stage"), inputs, outputs


def _share_attr(gm: fx.GraphModule, holder: torch.nn.Module, target: str) -> None:
    """Reference (not copy) a constant of `gm` from a stage module."""
    if "." in target:
        raise NotImplementedError(f"nested constant {target!r}: capture registers constants flat")
    holder.register_buffer(target, getattr(gm, target), persistent=False)
