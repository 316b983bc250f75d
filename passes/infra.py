"""Pass infrastructure: pre/postconditions, passes that may only annotate, and pass lists run by `PassManager`.

Every pass is a `torch.fx` `PassBase`: `requires(gm)` states what it needs (e.g. every node tainted), `ensures(gm)`
what it leaves (e.g. every op labelled), and a broken condition raises `PassConditionError` naming the pass.
An `AnnotationPass` (an analysis or a labelling) only writes `node.meta`: it raises `GraphChangedError` if its
`call` changed the graph, as ExecuTorch's `to_backend` checks its partitioners. `run_passes` runs a pass list
under torch's `PassManager`, linting the graph around every pass and logging it after each one to the
"secure_split" logger at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

log = logging.getLogger("secure_split")


class PassConditionError(RuntimeError):
    """A pass was given a graph it cannot work on, or left one that breaks what it promises."""


class GraphChangedError(RuntimeError):
    """A pass that may only annotate nodes (`AnnotationPass`) changed the graph."""


def require(pass_: PassBase, ok: bool, what: str) -> None:
    """Raise `PassConditionError` naming `pass_` unless `ok`; `what` says what is missing."""
    if not ok:
        raise PassConditionError(f"{type(pass_).__name__}: {what}")


def require_meta(pass_: PassBase, nodes: Iterable[fx.Node], key: str, what: str) -> None:
    """Every node of `nodes` has `key` in its meta, else a `PassConditionError` naming the first few missing."""
    missing = [n.name for n in nodes if key not in n.meta]
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    require(pass_, not missing, f"{what}: no {key!r} on {shown}")


def graph_signature(gm: fx.GraphModule) -> tuple:
    """What a graph computes, node by node: op, name, target, and arguments (nodes by name)."""
    return tuple(
        (n.op, n.name, _target(n.target), str(n.args), str(sorted(n.kwargs.items()))) for n in gm.graph.nodes
    )


def _target(target: object) -> object:
    return target if callable(target) else str(target)


class AnnotationPass(PassBase):
    """A pass that only writes `node.meta`; calling it raises `GraphChangedError` if `call` changed the graph."""

    def __call__(self, graph_module: fx.GraphModule) -> PassResult | None:
        before = graph_signature(graph_module)
        result = super().__call__(graph_module)
        after = graph_signature(graph_module)
        if after != before:
            raise GraphChangedError(f"{type(self).__name__} may only annotate nodes, but {_change(before, after)}")
        return result


def _change(before: tuple, after: tuple) -> str:
    """The first difference between two graph signatures, in words."""
    for old, new in zip(before, after, strict=False):
        if old != new:
            return f"it changed node {old[1]} ({old[2]}{old[3]}) into {new[1]} ({new[2]}{new[3]})"
    return f"it changed the graph from {len(before)} to {len(after)} nodes"


def run_passes(passes: Sequence[PassBase], graph_module: fx.GraphModule) -> fx.GraphModule:
    """Run `passes` in order under torch's `PassManager`; returns the resulting graph module.

    The graph is linted before and after each pass, and logged after each one at DEBUG. An error a pass raises
    is raised as it is (PassManager wraps it), with a note naming the pass and the passes that ran before it."""
    manager = PassManager([_logged(p) for p in passes], run_checks_after_each_pass=True)
    manager.add_checks(_lint)
    try:
        return manager(graph_module).graph_module
    except Exception as err:
        original = err.__cause__
        if original is None:
            raise
        original.add_note(str(err))
        original.__suppress_context__ = True
        raise original  # noqa: B904 (the wrapper's message is kept as a note)


def _logged(pass_: PassBase):
    name = type(pass_).__name__

    def run(graph_module: fx.GraphModule) -> PassResult:
        result = pass_(graph_module)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("after %s:\n%s", name, result.graph_module.print_readable(print_output=False))
        return result

    run.__name__ = name  # PassManager names the pass by it in its errors
    return run


def _lint(graph_module: fx.GraphModule) -> None:
    graph_module.graph.lint()
