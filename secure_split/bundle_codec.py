"""The bundle manifest's buckets: a `SplitArtifact` written out as JSON, and read back (with its stage files).

A bundle directory holds:

    manifest.json                  the schema below (version 2)
    manifest.json.hmac             its HMAC-SHA256 under the enclave's bundle key (`bundle_trust`)
    enclave/stage<N>_enclave.onnx  run by the enclave, on onnxruntime's CPU provider
    gpu/stage<N>_gpu.onnx          public weights only; run on the CUDA provider when present
    <file>.onnx.data               a stage's weights, when they exceed 1 MiB (ONNX external data)
    enclave/stage<N>_gpu_check.onnx  verify=True: a GPU stage's transpose s -> Lᵀs, for the enclave's checks
    enclave/token_embeddings.npy   cmif: the embedding table the token sanitizer draws replacements from

manifest.json: `format` ("secure_split.bundle"), `version` (2), `producer` (secure_split, torch, onnx versions and
the opset), `model` (where the model came from, if the exporter said), `config` (the SplitConfig fields the
runtime needs; never a seed or a key), `buckets` (one split per shape; each: `batch`, `seq`, `inputs` (the flat
inputs in call order: the model argument each one is, shape, dtype), `token_inputs` (positions cmif sanitizes),
`stages` (in order: side, file, input and output value names, ring output bits, the parameters the file holds),
`boundary` (the boundary graph in order: inputs, stage calls, their items, and every mask/unmask with its cut),
`outputs` (which boundary values the model returns, in its output order, and their shapes)), `dynamic_axes`
(which input and output dimensions are the batch and the sequence; empty for a single-shape bundle) and `files`
(`sha256` and `size` of every other file but the tag). A bundle with several buckets keeps each bucket's files
under `b<batch>_t<seq>/`.
Masking, unmasking and the key pool are the enclave runtime's: no GPU file holds a mask, an unmask term or a
private parameter.
A bucket also keeps the artifact's compile-time facts, `counts` (nodes and FLOPs per side, private ops kept)
and `graph` (what a drawing needs), so a loaded bundle reports and draws as the program it was exported from.
These are informative only: what is enforced is re-derived on load (`bundle_trust.audit_loaded`).
"""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from secure_split.partitioner.stages import StageSpec
from secure_split.passes.capture import argument_name
from secure_split.passes.insert_masks import Cut, mask, unmask
from secure_split.passes.meta import CUT, SIDE
from secure_split.runtime.manifest import BundleError, file_digest, model_name
from secure_split.runtime.remote import RemoteStage, WorkerClient

from .artifact import CompiledCounts, SplitArtifact, StageFacts
from .config import SplitConfig
from .draw import GraphEdge, GraphNode, SplitGraph
from .onnx_stage import CPU, OnnxStage


def encode_bucket(artifact: SplitArtifact, stages: list[dict[str, Any]], order: list[int] | None) -> dict[str, Any]:
    """The manifest's entry for one split, around the `stages` entries its files were written with."""
    inputs = encode_inputs(artifact)
    shape = next((e["shape"] for e in inputs if len(e["shape"]) == 2), [None, None])
    graph = artifact.graph
    return {"batch": shape[0], "seq": shape[1], "inputs": inputs, "token_inputs": list(artifact.token_inputs),
            "stages": stages, "boundary": [_encode_node(n) for n in artifact.boundary.graph.nodes if n.op != "output"],
            "outputs": _outputs(artifact, order), "counts": dataclasses.asdict(artifact.counts),
            "graph": {"nodes": [dataclasses.astuple(n) for n in graph.nodes],
                      "edges": [[e.src, e.dst, list(e.cuts)] for e in graph.edges]},
            "verdict": artifact.verdict}  # fmt: skip


def decode_bucket(
    root: Path, bucket: dict[str, Any], files: dict[str, dict[str, Any]], config: SplitConfig, gpu: list[str],
    worker: WorkerClient | None,
) -> tuple[SplitArtifact, dict[str, torch.nn.Module]]:
    """The artifact of one bucket, its boundary calling one CPU `OnnxStage` per stage file (the enclave's own
    copies), and what the GPU runs: sessions on its providers, opened now (a provider that cannot serve them
    fails here), or the worker's stages."""
    holder, graph = torch.nn.Module(), fx.Graph()
    specs, facts, on_gpu = [], {}, {}
    for stage in bucket["stages"]:
        digest, path, names = file_digest(files, stage["file"]), root / stage["file"], stage["onnx_inputs"]
        holder.add_module(stage["name"], OnnxStage(path, [CPU], names))
        if stage["side"] == "gpu" and worker is not None:
            on_gpu[stage["name"]] = RemoteStage(worker, model_name(stage["file"]), names)
        elif stage["side"] == "gpu":
            on_gpu[stage["name"]] = OnnxStage(path, gpu, names)
            on_gpu[stage["name"]].open()
        specs.append(StageSpec(stage["index"], stage["side"], stage["name"], tuple(stage["inputs"]),
                               tuple(stage["outputs"]), stage["num_nodes"], stage["flops"]))  # fmt: skip
        bits = stage["ring_bits"]
        facts[stage["name"]] = StageFacts(tuple(stage["parameters"]), None if bits is None else tuple(bits),
                                          f"onnx sha256 {digest}")  # fmt: skip
    env: dict[str, fx.Node] = {}
    for entry in bucket["boundary"]:
        env[entry["name"]] = _decode_node(graph, entry, env)
    graph.output(tuple(env[v] for v in bucket["outputs"]["values"]))
    boundary = fx.GraphModule(holder, graph, "SplitBoundary")
    drawn = SplitGraph(tuple(GraphNode(*n) for n in bucket["graph"]["nodes"]),
                       tuple(GraphEdge(s, d, tuple(c)) for s, d, c in bucket["graph"]["edges"]))  # fmt: skip
    sources = tuple(entry["source"] for entry in bucket["inputs"])
    artifact = SplitArtifact(config, boundary, tuple(specs), sources, tuple(bucket["token_inputs"]),
                             CompiledCounts(**bucket["counts"]), facts, drawn, bucket["verdict"])  # fmt: skip
    return artifact, on_gpu


def encode_inputs(artifact: SplitArtifact) -> list[dict[str, Any]]:
    """The flat graph inputs in call order: the model argument each one is, its shape and dtype."""
    placeholders = [n for n in artifact.boundary.graph.nodes if n.op == "placeholder"]
    pairs = zip(placeholders, artifact.input_sources, strict=True)
    return [{"source": source, "name": _argument_name(source), "shape": list(n.meta["val"].shape),
             "dtype": str(n.meta["val"].dtype)} for n, source in pairs]  # fmt: skip


def argument(entry: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The model argument a manifest input entry names, from a call's arguments."""
    name = entry["name"]
    if name.startswith("args["):
        position = int(name[5:-1])
        if position < len(args):
            return args[position]
    elif name in kwargs:
        return kwargs[name]
    raise TypeError(f"the bundle needs input {name!r} (as when it was exported: {entry['source']})")


def _outputs(artifact: SplitArtifact, order: list[int] | None) -> dict[str, Any]:
    output = next(n for n in artifact.boundary.graph.nodes if n.op == "output")
    leaves = [n.name for n in tree_leaves(output.args[0]) if isinstance(n, fx.Node)]
    if len(leaves) != len(tree_leaves(output.args[0])):
        raise NotImplementedError("the model returns a non-tensor value: bundles return tensors only")
    order = order or list(range(len(leaves)))
    shapes = [list(leaf.meta["val"].shape) for leaf in tree_leaves(output.args[0])]
    return {"values": leaves, "order": order, "shapes": [shapes[i] for i in order]}


def _encode_node(node: fx.Node) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": node.name}
    if node.op == "placeholder":
        entry["op"] = "input"
    elif node.op == "call_module":
        entry.update(op="stage", stage=str(node.target), side=node.meta[SIDE], args=[a.name for a in node.args])
    elif node.target is operator.getitem:
        entry.update(op="item", args=[node.args[0].name], index=node.args[1])
    elif node.target in (mask, unmask):
        cut: Cut = node.meta[CUT]
        entry.update(op=node.target.__name__, args=[node.args[0].name], dtype=str(node.meta["val"].dtype),
                     cut={**cut.__dict__, "dtype": str(cut.dtype)})  # fmt: skip
    else:
        raise NotImplementedError(f"boundary node {node.name} ({node.op} {node.target}) has no bundle encoding")
    return entry


def _decode_node(graph: fx.Graph, entry: dict[str, Any], env: dict[str, fx.Node]) -> fx.Node:
    args = tuple(env[a] for a in entry.get("args", ()))
    op = entry["op"]
    if op == "input":
        node = graph.placeholder(entry["name"])
    elif op == "stage":
        node = graph.call_module(entry["stage"], args)
        node.meta[SIDE] = entry["side"]
    elif op == "item":
        node = graph.call_function(operator.getitem, (args[0], entry["index"]))
    elif op in ("mask", "unmask"):
        node = graph.call_function(mask if op == "mask" else unmask, args)
        cut = dict(entry["cut"])
        cut.update(dtype=_dtype(cut["dtype"]), shape=tuple(cut["shape"]), stride=tuple(cut["stride"]))
        node.meta[CUT] = Cut(**cut)
        node.meta["val"] = torch.empty(0, dtype=_dtype(entry["dtype"]))
    else:
        raise BundleError(f"manifest boundary node {entry['name']!r} has unknown op {op!r}")
    node.name = entry["name"]
    return node


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise BundleError(f"manifest names an unknown dtype {name!r}")
    return dtype


def _argument_name(source: str) -> str:
    name = argument_name(source)
    if name is None:
        raise NotImplementedError(f"graph input {source!r} is not a plain argument of the model: cannot bundle it")
    return name
