"""ONNX split bundles: a split program as one ONNX file per stage and a manifest, run by onnxruntime.

A bundle directory holds:

    manifest.json                  the schema below (version 1)
    enclave/stage<N>_enclave.onnx  run by the enclave, on onnxruntime's CPU provider
    gpu/stage<N>_gpu.onnx          public weights only; run on the CUDA provider when present
    <file>.onnx.data               a stage's weights, when they exceed 1 MiB (ONNX external data)

manifest.json: `format` ("secure_split.bundle"), `version` (1), `producer` (secure_split, torch, onnx versions and
the opset), `config` (the SplitConfig fields the runtime needs; never a seed or a key), `inputs` (the flat inputs
in call order: the model argument each one is, shape, dtype), `token_inputs` (positions cmif sanitizes),
`stages` (in order: side, file, input and output value names, ring output bits, the parameters the file holds),
`boundary` (the boundary graph in order: inputs, stage calls, their items, and every mask/unmask with its cut),
`outputs` (which boundary values the model returns, in its output order), `dynamic_axes` (none in this version:
a bundle serves the shapes it was exported for) and `files` (sha256 of every other file). Masking, unmasking and
the key pool are the enclave runtime's: no GPU file holds a mask, an unmask term or a private parameter.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from secure_split.partitioner.stages import PartitionResult, StageSpec
from secure_split.passes.insert_masks import Cut, mask, unmask
from secure_split.passes.leak_audit import LeakError
from secure_split.passes.meta import CUT, PARAM_NAMES, PRIVATE_PARAM, SIDE, STAGE, WEIGHTS
from secure_split.passes.portable_attention import portable
from secure_split.passes.ring_lower import RING_BITS

from .config import SplitConfig
from .onnx_stage import CPU, OnnxStage, gpu_providers
from .program import SplitProgram

FORMAT, VERSION, OPSET = "secure_split.bundle", 1, 18
RUNTIME_FIELDS = ("policy", "masking", "mask_scale", "remo_rank", "frac_bits", "activation_bound", "ring_kernel",
                  "pool_empty")  # fmt: skip
EXTERNAL_DATA_BYTES = 1 << 20
_SOURCE = re.compile(r"^L\['(?:args'\]\[(\d+)\]|kwargs'\]\['(\w+)'\]|(\w+)'\])$")


class BundleError(ValueError):
    """A bundle directory is refused: a file is missing or altered, or the manifest does not fit the schema."""


def export_bundle(
    model: torch.nn.Module | SplitProgram,
    args: tuple[Any, ...] | Any,
    path: str | Path,
    config: SplitConfig | None = None,
    kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    about: dict[str, Any] | None = None,
) -> Path:
    """Split `model` on example inputs (or take a `SplitProgram`) and write its ONNX split bundle to `path`.

    `config.private` is checked again against every GPU stage: a file that would carry a private parameter is
    refused. `progress(done, total, file)` is called as each stage file is written; `about` (JSON-able, e.g.
    where the model came from) is kept in the manifest as "model"."""
    from .api import split

    args = args if isinstance(args, tuple) else (args,)
    program = model if isinstance(model, SplitProgram) else split(model, args, kwargs, config)
    config = config or program.config
    if program.config.verify:
        raise NotImplementedError("verify=True checks GPU stages by float64 autograd through torch: not in bundles")
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: a bundle is written into a new or empty directory")
    order = _output_order(model, program, args, kwargs) if not isinstance(model, SplitProgram) else None
    stages = []
    for done, spec in enumerate(program.partition.stages):
        if progress is not None:
            progress(done, len(program.partition.stages), f"{spec.side}/{spec.module_name}.onnx")
        stages.append(_export_stage(program, spec, root, config.private))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "producer": _producer(),
        "model": about or {},
        "config": {name: getattr(program.config, name) for name in RUNTIME_FIELDS},
        "inputs": _inputs(program),
        "token_inputs": program.token_inputs,
        "stages": stages,
        "boundary": [_encode_node(n) for n in program.boundary.graph.nodes if n.op != "output"],
        "outputs": _outputs(program, order),
        "dynamic_axes": {},
        "files": {str(f.relative_to(root)): _sha256(f) for f in sorted(root.rglob("*")) if f.is_file()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def load_bundle(path: str | Path, providers: list[str] | None = None, seed: int | None = None) -> BundleSession:
    """Check and open a bundle; GPU stages run on `providers` (default: CUDA when present, else the CPU).

    `seed` makes the enclave's mask stream reproducible (tests, benchmarks); None draws a fresh key."""
    root = Path(path)
    manifest = _read_manifest(root)
    _check_files(root, manifest["files"])
    config = SplitConfig(**manifest["config"], seed=seed, device="cpu")
    gpu = gpu_providers(providers)
    boundary, specs, on_gpu = _rebuild(root, manifest, gpu)
    for stage in on_gpu.values():  # open the GPU sessions now: a provider that cannot serve them fails here
        stage.open()
    partition = PartitionResult(fx.GraphModule(torch.nn.Module(), fx.Graph()), boundary, specs)
    sources = [entry["source"] for entry in manifest["inputs"]]
    program = SplitProgram(partition, config, sources, manifest["token_inputs"], gpu_modules=on_gpu)
    return BundleSession(program, manifest, gpu)


class BundleSession:
    """A loaded bundle, called like the model (same positional and keyword tensors); returns its output tensors."""

    def __init__(self, program: SplitProgram, manifest: dict[str, Any], gpu_providers: list[str]) -> None:
        self.program = program
        self.manifest = manifest
        self.gpu_providers = gpu_providers

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = []
        for entry in self.manifest["inputs"]:
            value = _argument(entry, args, kwargs)
            if tuple(value.shape) != tuple(entry["shape"]) or str(value.dtype) != entry["dtype"]:
                raise ValueError(
                    f"bundle input {entry['name']!r} is {tuple(value.shape)} {value.dtype}; this bundle serves "
                    f"{tuple(entry['shape'])} {entry['dtype']} (static shapes): export one for these inputs"
                )
            flat.append(value)
        result = tree_leaves(self.program.run(*flat))
        return tuple(result[i] for i in self.manifest["outputs"]["order"])


# -- export ------------------------------------------------------------------------------------------------


def _export_stage(program: SplitProgram, spec: StageSpec, root: Path, private: tuple[str, ...]) -> dict[str, Any]:
    module = program.partition.stage_module(spec)
    held = _stage_parameters(program, spec)
    if spec.side == "gpu":
        _refuse_private(program, spec, private)
    call = next(n for n in program.boundary.graph.nodes if n.op == "call_module" and n.target == spec.module_name)
    names = [f"in{i}" for i in range(len(call.args))]  # neutral names: none clashes with the exporter's own
    relative = f"{spec.side}/{spec.module_name}.onnx"
    outputs = [f"out{i}" for i in range(len(spec.outputs))]
    _write_onnx(portable(module), tuple(_example(a) for a in call.args), names, outputs, root / relative)
    bits = module.meta.get(RING_BITS) if hasattr(module, "meta") else None
    return {"index": spec.index, "side": spec.side, "name": spec.module_name, "file": relative,
            "inputs": list(spec.inputs), "outputs": list(spec.outputs), "onnx_inputs": names,
            "ring_bits": bits, "parameters": held,
            "num_nodes": spec.num_nodes, "flops": spec.flops}  # fmt: skip


def _write_onnx(module: fx.GraphModule, example: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            module, example, dynamo=True, input_names=inputs, output_names=outputs, opset_version=OPSET,
            optimize=False, verbose=False,
        )  # fmt: skip
    weights = sum(t.numel() * t.element_size() for t in module.buffers())
    onnx_program.save(str(path), external_data=weights > EXTERNAL_DATA_BYTES)


def _example(arg: fx.Node) -> torch.Tensor:
    """A stage input of the right shape and dtype: what crosses (a cut's wire value) or the enclave's value."""
    if arg.target is mask:
        return arg.meta[CUT].empty().zero_()
    val = arg.meta["val"]
    return torch.zeros(tuple(val.shape), dtype=val.dtype)


def _stage_parameters(program: SplitProgram, spec: StageSpec) -> list[str]:
    names: set[str] = set()
    for node in program.partition.labelled.graph.nodes:
        if node.op == "get_attr" and any(u.meta.get(STAGE) == spec.index for u in node.users):
            names.update(node.meta.get(WEIGHTS, ()))
    return sorted(names)


def _refuse_private(program: SplitProgram, spec: StageSpec, private: tuple[str, ...]) -> None:
    """A GPU stage file must hold no private parameter: by the program's labels or by the export's globs."""
    for node in program.partition.labelled.graph.nodes:
        if node.op != "get_attr" or not any(u.meta.get(STAGE) == spec.index for u in node.users):
            continue
        names = node.meta.get(PARAM_NAMES, ())
        if node.meta.get(PRIVATE_PARAM) or any(fnmatchcase(n, g) for n in names for g in private):
            raise LeakError(f"gpu/{spec.module_name}.onnx would carry private parameter(s) {list(names)}: refused")


def _inputs(program: SplitProgram) -> list[dict[str, Any]]:
    placeholders = [n for n in program.boundary.graph.nodes if n.op == "placeholder"]
    pairs = zip(placeholders, program.input_names, strict=True)
    return [{"source": source, "name": _argument_name(source), "shape": list(n.meta["val"].shape),
             "dtype": str(n.meta["val"].dtype)} for n, source in pairs]  # fmt: skip


def _outputs(program: SplitProgram, order: list[int] | None) -> dict[str, Any]:
    output = next(n for n in program.boundary.graph.nodes if n.op == "output")
    leaves = [n.name for n in tree_leaves(output.args[0]) if isinstance(n, fx.Node)]
    if len(leaves) != len(tree_leaves(output.args[0])):
        raise NotImplementedError("the model returns a non-tensor value: bundles return tensors only")
    return {"values": leaves, "order": order or list(range(len(leaves)))}


def _output_order(model: torch.nn.Module, program: SplitProgram, args: tuple, kwargs: dict | None) -> list[int]:
    """Graph outputs in the model's own output order, matched by value on the example inputs."""
    flat = [_argument(entry, args, kwargs or {}) for entry in _inputs(program)]
    with torch.no_grad():
        expected = [t for t in tree_leaves(model(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
        got = list(tree_leaves(program.run(*flat)))
    order: list[int] = []
    for want in expected:
        match = [i for i, t in enumerate(got) if i not in order and t.shape == want.shape
                 and torch.allclose(t.double(), want.double(), atol=1e-2, rtol=1e-2)]  # fmt: skip
        if match:
            order.append(match[0])
    return order + [i for i in range(len(got)) if i not in order]


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


def _producer() -> dict[str, Any]:
    import onnx

    from . import __version__

    return {"secure_split": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET}


def _argument_name(source: str) -> str:
    """"L['args'][0]" -> "args[0]", "L['kwargs']['attention_mask']" or "L['attention_mask']" -> "attention_mask"."""
    match = _SOURCE.match(source)
    if match is None:
        raise NotImplementedError(f"graph input {source!r} is not a plain argument of the model: cannot bundle it")
    position, keyword, plain = match.groups()
    return f"args[{position}]" if position is not None else keyword or plain


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- load --------------------------------------------------------------------------------------------------


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not a readable manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleError(f"{path}: not a {FORMAT} manifest of version {VERSION}")
    required = ("producer", "config", "inputs", "token_inputs", "stages", "boundary", "outputs", "files")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {missing}")
    return manifest


def _check_files(root: Path, files: dict[str, str]) -> None:
    for relative, digest in files.items():
        path = root / relative
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        if _sha256(path) != digest:
            raise BundleError(f"{path}: sha256 does not match the manifest (altered file)")
    extra = [f for f in root.rglob("*") if f.is_file() and f.name != "manifest.json" and
             str(f.relative_to(root)) not in files]  # fmt: skip
    if extra:
        raise BundleError(f"{extra[0]}: not listed in the manifest")


def _rebuild(
    root: Path, manifest: dict[str, Any], gpu: list[str]
) -> tuple[fx.GraphModule, list[StageSpec], dict[str, OnnxStage]]:
    """The boundary graph, calling one OnnxStage per stage file (CPU copies for the enclave's own use)."""
    holder, graph = torch.nn.Module(), fx.Graph()
    env: dict[str, fx.Node] = {}
    specs, on_gpu = [], {}
    digests = manifest["files"]
    for stage in manifest["stages"]:
        digest, path = digests[stage["file"]], root / stage["file"]
        names, bits = stage["onnx_inputs"], stage["ring_bits"]
        holder.add_module(stage["name"], OnnxStage(path, [CPU], digest, names, bits))
        if stage["side"] == "gpu":
            on_gpu[stage["name"]] = OnnxStage(path, gpu, digest, names, bits)
        specs.append(StageSpec(stage["index"], stage["side"], stage["name"], tuple(stage["inputs"]),
                               tuple(stage["outputs"]), stage["num_nodes"], stage["flops"]))  # fmt: skip
    for entry in manifest["boundary"]:
        env[entry["name"]] = _decode_node(graph, entry, env)
    values = manifest["outputs"]["values"]
    graph.output(tuple(env[v] for v in values))
    return fx.GraphModule(holder, graph, "SplitBoundary"), specs, on_gpu


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


def _argument(entry: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    name = entry["name"]
    if name.startswith("args["):
        position = int(name[5:-1])
        if position < len(args):
            return args[position]
    elif name in kwargs:
        return kwargs[name]
    raise TypeError(f"the bundle needs input {name!r} (as when it was exported: {entry['source']})")
