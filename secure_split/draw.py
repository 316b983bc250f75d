"""Drawing a split: enclave and GPU lanes, one band per stage, cut edges labelled with the bytes that cross.

`extract_graph` keeps what a drawing needs from a split, at compile time (plain names, sides, stages, edges and
the cuts on them); `draw_report` renders it with matplotlib, which is imported only when something is drawn.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secure_split.passes.insert_masks import unmask
from secure_split.passes.label import ENCLAVE, GPU, is_getitem, producer
from secure_split.passes.meta import CUT, SIDE, STAGE

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from torch import fx

    from .report import PartitionReport

FORMATS = (".svg", ".png")
LANE_Y = {ENCLAVE: 1.0, GPU: 0.0}
COLOURS = {ENCLAVE: "tab:green", GPU: "tab:orange", "to_gpu": "tab:red", "to_enclave": "tab:blue"}
STAGE_GAP = 1.5  # x units between two stage bands, room for the cut edges
LABEL_AT = (0.5, 0.3, 0.7)  # where cut labels sit along their edges, in turn: neighbouring labels do not overlap


@dataclass(frozen=True)
class GraphNode:
    """One op of the labelled graph (multi-output ops count once), or a model input or output."""

    name: str
    side: str
    stage: int
    kind: str  # "op", "input" or "output"


@dataclass(frozen=True)
class GraphEdge:
    """A data dependency between two drawn nodes, and the cuts (`Cut.index`) the value takes on the way."""

    src: int
    dst: int
    cuts: tuple[int, ...]


@dataclass(frozen=True)
class SplitGraph:
    """Nodes in topological order, and the edges between them (public constants left out)."""

    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]


def extract_graph(labelled: fx.GraphModule, boundary: fx.GraphModule) -> SplitGraph:
    """The labelled graph as drawable nodes and edges, each crossing tied to its `Cut` in `boundary`."""
    crossings = _cut_indices(boundary)
    index: dict[fx.Node, int] = {}
    nodes: list[GraphNode] = []
    edges: list[GraphEdge] = []
    for node in labelled.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output") or is_getitem(node):
            continue
        inputs = [u for u in node.all_input_nodes if u.op != "get_attr"]
        for value in inputs:
            edges.append(GraphEdge(index[producer(value)], len(nodes), _crossing(value, node, crossings)))
        stage = node.meta[STAGE] if STAGE in node.meta else _output_stage(inputs)
        kind = {"placeholder": "input", "output": "output"}.get(node.op, "op")
        index[node] = len(nodes)
        nodes.append(GraphNode(node.name, node.meta[SIDE], stage, kind))
    return SplitGraph(tuple(nodes), tuple(edges))


def _cut_indices(boundary: fx.GraphModule) -> dict[tuple[str, str], int]:
    """(name of the value in the labelled graph, direction) -> `Cut.index`."""
    found = {}
    for node in boundary.graph.nodes:
        if CUT in node.meta:
            value = node.args[0]
            if value.target is unmask:  # a GPU result that a later GPU stage reads goes via the enclave
                value = value.args[0]
            found[(value.name, node.meta[CUT].direction)] = node.meta[CUT].index
    return found


def _crossing(value: fx.Node, user: fx.Node, crossings: dict[tuple[str, str], int]) -> tuple[int, ...]:
    """The cuts `value` takes to reach `user`: none on one side, two for a GPU value read by a later GPU stage."""
    src, dst = value.meta[SIDE], user.meta[SIDE]
    if src == GPU and dst == GPU and user.meta[STAGE] != value.meta[STAGE]:
        directions = ("to_enclave", "to_gpu")
    elif src != dst:
        directions = ("to_gpu",) if dst == GPU else ("to_enclave",)
    else:
        directions = ()
    return tuple(crossings[(value.name, d)] for d in directions if (value.name, d) in crossings)


def _output_stage(inputs: list[fx.Node]) -> int:
    """The model output is read in the enclave: the stage after the last GPU stage it depends on."""
    return max((u.meta[STAGE] + (u.meta[SIDE] == GPU) for u in inputs), default=0)


def format_bytes(n: int) -> str:
    """1234567 -> "1.2 MB" (decimal units), as the cut labels read."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def draw_report(report: PartitionReport, path: str | Path) -> Path:
    """Render `report.graph` to `path` (.svg or .png); returns the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"PartitionReport.draw writes {' or '.join(FORMATS)} files, not {path.name!r}")
    if report.graph is None:
        raise ValueError("this report has no graph to draw: take it from SplitProgram.report()")
    import matplotlib
    from matplotlib.figure import Figure

    xy, bands = _layout(report.graph)
    span = max(x for x, _ in xy) + 2
    figure = Figure(figsize=(min(max(10.0, 0.12 * span + 2), 150.0), 5.0))
    ax = figure.add_subplot()
    _draw_lanes(ax, bands)
    _draw_edges(ax, report, xy)
    _draw_nodes(ax, report.graph, xy)
    ax.set_xlim(-1.5, span)
    ax.set_title(_title(report), loc="left", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=8, fontsize=7, frameon=False)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, and smaller
        figure.savefig(path, bbox_inches="tight", dpi=120)
    return path


def _layout(graph: SplitGraph) -> tuple[list[tuple[float, float]], dict[int, tuple[float, float]]]:
    """Node positions (x: stage band, then depth in the stage; y: the side's lane) and each stage's x range."""
    depth = [0] * len(graph.nodes)
    for edge in graph.edges:  # in topological order of `dst`, so `depth[src]` is final
        if graph.nodes[edge.src].stage == graph.nodes[edge.dst].stage:
            depth[edge.dst] = max(depth[edge.dst], depth[edge.src] + 1)
    width: dict[int, int] = defaultdict(int)
    stacks: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, node in enumerate(graph.nodes):
        width[node.stage] = max(width[node.stage], depth[i] + 1)
        stacks[(node.stage, depth[i])].append(i)
    start, bands = 0.0, {}
    for stage in sorted(width):
        bands[stage] = (start, start + width[stage] - 1)
        start += width[stage] + STAGE_GAP
    xy = [(0.0, 0.0)] * len(graph.nodes)
    for (stage, d), members in stacks.items():
        spread = min(0.3, 0.08 * (len(members) - 1))
        for k, i in enumerate(members):
            offset = spread * (2 * k / (len(members) - 1) - 1) if len(members) > 1 else 0.0
            xy[i] = (bands[stage][0] + d, LANE_Y[graph.nodes[i].side] + offset)
    return xy, bands


def _draw_lanes(ax: Axes, bands: dict[int, tuple[float, float]]) -> None:
    """Lane shading, a dotted line between stages, and the stage numbers as x ticks."""
    for side in (ENCLAVE, GPU):
        ax.axhspan(LANE_Y[side] - 0.42, LANE_Y[side] + 0.42, color=COLOURS[side], alpha=0.08, lw=0)
    for first, _ in list(bands.values())[1:]:
        ax.axvline(first - STAGE_GAP / 2 - 0.5, color="grey", lw=0.4, ls=":")
    ax.set_xticks([(a + b) / 2 for a, b in bands.values()], [str(s) for s in bands], fontsize=6)
    ax.set_xlabel("stage (even: enclave, odd: GPU)", fontsize=8)
    ax.set_yticks([LANE_Y[GPU], LANE_Y[ENCLAVE]], ["GPU (untrusted)", "enclave (trusted CPU)"], fontsize=8)
    ax.set_ylim(-0.65, 1.65)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw_edges(ax: Axes, report: PartitionReport, xy: list[tuple[float, float]]) -> None:
    """Edges on one side in grey, cut edges coloured by direction with arrows; each cut labelled once."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath

    graph = report.graph
    cuts = {c["index"]: c for c in report.cut_table}
    plain, shown = [], set()
    for edge in graph.edges:
        src, dst = graph.nodes[edge.src], graph.nodes[edge.dst]
        if not edge.cuts:
            bulge = 0.0 if src.stage == dst.stage else 0.5 if src.side == ENCLAVE else -0.5
            plain.append(_curve(xy[edge.src], xy[edge.dst], bulge))
            continue
        bulge = 1.6 if src.side == dst.side else 0.0  # GPU -> GPU goes through the enclave: arc up into its lane
        points = _curve(xy[edge.src], xy[edge.dst], bulge)
        colour = COLOURS[cuts[edge.cuts[-1]]["direction"]]
        ax.add_patch(FancyArrowPatch(path=MplPath(points), arrowstyle="-|>", mutation_scale=6, color=colour,
                                     lw=0.8, zorder=2))  # fmt: skip
        text = " + ".join(_cut_label(cuts[i], report.masking) for i in edge.cuts if i not in shown)
        shown.update(edge.cuts)
        if text:
            x, y = points[round(LABEL_AT[edge.cuts[0] % len(LABEL_AT)] * (len(points) - 1))]
            ax.text(x, y, text, fontsize=5, rotation=90, ha="center", va="center", color=colour, zorder=4,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    ax.add_collection(LineCollection(plain, colors="grey", linewidths=0.4, alpha=0.6, zorder=1))
    ax.plot([], [], color="grey", lw=0.6, label="data edge (same side)")
    for direction, label in (("to_gpu", "cut: enclave → GPU"), ("to_enclave", "cut: GPU → enclave")):
        ax.plot([], [], color=COLOURS[direction], lw=1, marker=">", markersize=4, label=label)


def _curve(start: tuple[float, float], end: tuple[float, float], bulge: float) -> np.ndarray:
    """A quadratic Bézier from `start` to `end` whose middle is `bulge / 2` above the straight line."""
    import numpy as np

    (x0, y0), (x1, y1) = start, end
    control = np.array([(x0 + x1) / 2, (y0 + y1) / 2 + bulge])
    t = np.linspace(0.0, 1.0, 17)[:, None]
    return (1 - t) ** 2 * np.array([x0, y0]) + 2 * t * (1 - t) * control + t**2 * np.array([x1, y1])


def _cut_label(cut: dict[str, Any], masking: str) -> str:
    """The bytes of one crossing, and its protection when that is not the program's masking (e.g. public)."""
    size = format_bytes(cut["bytes"])
    return size if cut["protection"] == masking else f"{size} ({cut['protection']})"


def _draw_nodes(ax: Axes, graph: SplitGraph, xy: list[tuple[float, float]]) -> None:
    """Ops as small dots in their side's colour; model inputs and outputs as larger outlined markers."""
    styles = {
        (ENCLAVE, "op"): ("o", 14, "enclave op"),
        (GPU, "op"): ("o", 14, "GPU op"),
        (ENCLAVE, "input"): ("s", 30, "model input"),
        (ENCLAVE, "output"): ("D", 30, "model output"),
    }
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, node in enumerate(graph.nodes):
        groups[(node.side, node.kind)].append(i)
    for (side, kind), members in groups.items():
        marker, size, label = styles.get((side, kind), ("o", 14, f"{side} {kind}"))
        ax.scatter([xy[i][0] for i in members], [xy[i][1] for i in members], s=size, marker=marker,
                   c=COLOURS[side], edgecolors="black" if kind != "op" else "none", linewidths=0.6, zorder=3,
                   label=label)  # fmt: skip


def _title(report: PartitionReport) -> str:
    """Policy, masking and the report's key counts."""
    return (
        f"secure_split: policy {report.policy}, masking {report.masking}: "
        f"{report.enclave_nodes} enclave / {report.gpu_nodes} GPU ops, {report.stages} stages, "
        f"{report.cuts} cuts, {format_bytes(report.bytes_to_gpu)} to the GPU / "
        f"{format_bytes(report.bytes_to_enclave)} back per call"
    )
