"""ONNX split bundles: a split program as one ONNX file per stage and a manifest, run by onnxruntime.

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
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from secure_split.enclave_runtime.integrity import StageVerifier
from secure_split.partitioner.stages import PartitionResult, StageSpec
from secure_split.passes.capture import argument_name
from secure_split.passes.insert_masks import Cut, mask, unmask
from secure_split.passes.label_cmif import token_embeddings
from secure_split.passes.leak_audit import LeakError
from secure_split.passes.meta import CUT, PARAM_NAMES, PRIVATE_PARAM, RING_BITS, SIDE, STAGE, WEIGHTS
from secure_split.passes.onnx_lower import portable
from secure_split.runtime.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    BundleError,
    check_files,
    file_digest,
    file_entry,
    model_name,
)
from secure_split.runtime.remote import RemoteStage, WorkerClient
from secure_split.runtime.tls import TlsFiles

from .bundle_trust import (
    audit_loaded,
    authenticated_manifest,
    check_masking,
    check_plan,
    export_key,
    sign_manifest,
    write_key,
)
from .config import SplitConfig
from .onnx_stage import CPU, OnnxStage, gpu_providers
from .program import SplitProgram, make_sanitizer

OPSET = 18
RUNTIME_FIELDS = ("policy", "masking", "mask_scale", "remo_rank", "frac_bits", "activation_bound", "ring_kernel",
                  "pool_empty", "verify", "epsilon", "sanitizer", "sanitizer_k", "special_token_ids",
                  "public_inputs")  # fmt: skip
LOAD_OPTIONS = ("pool_empty", "precompute", "verify", "epsilon", "gpu_timeout_s", "gpu_retries")
TOKEN_EMBEDDINGS = "enclave/token_embeddings.npy"
EXTERNAL_DATA_BYTES = 1 << 20


def export_bundle(
    model: torch.nn.Module | SplitProgram,
    args: tuple[Any, ...] | Any,
    path: str | Path,
    config: SplitConfig | None = None,
    kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    about: dict[str, Any] | None = None,
    buckets: list[tuple[int, int]] | None = None,
    key: bytes | str | Path | None = None,
) -> Path:
    """Split `model` on example inputs (or take a `SplitProgram`) and write its ONNX split bundle to `path`.

    `buckets` [(batch, seq), ...] makes one bundle serve other shapes: a split per bucket (the example's 2-D
    inputs repeated or cut to its shape), and at run time inputs are padded to the smallest bucket that holds
    them (masked by their attention mask) and outputs cut back. `config.private` is checked again against
    every GPU stage: a file that would carry a private parameter is refused. `progress(done, total, file)` is
    called as each stage file is written; `about` (JSON-able, e.g. the model's source) is kept as "model".
    The manifest is signed with `key` (bytes, or a key file: read, or written with a fresh key if absent); None
    writes a fresh key to `<path>.key`, beside the bundle: `load_bundle` needs it, so keep it with the enclave."""
    from .api import split

    args = args if isinstance(args, tuple) else (args,)
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: a bundle is written into a new or empty directory")
    chosen = model.config if isinstance(model, SplitProgram) else config
    if chosen is not None and chosen.test_seed is not None:
        raise ValueError("export_bundle: SplitConfig.test_seed makes masks predictable; a bundle is for deployment")
    signing_key, new_key_file = export_key(key, root)
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(model, SplitProgram):
        if buckets:
            raise ValueError("buckets need the model (one split per bucket), not a SplitProgram")
        examples = [(model, None, "")]
    else:
        examples = []
        for batch, seq in buckets or [(None, None)]:
            bucket_args, bucket_kwargs = _fit_examples(args, kwargs or {}, batch, seq)
            torch._dynamo.reset()  # each bucket is a new split of the same model
            program = split(model, bucket_args, bucket_kwargs, config)
            order = _output_order(model, program, bucket_args, bucket_kwargs)
            examples.append((program, order, f"b{batch}_t{seq}/" if buckets else ""))
    config = config or examples[0][0].config
    total = sum(len(p.partition.stages) for p, _, _ in examples)
    written: list[dict[str, Any]] = []
    for program, order, prefix in examples:
        done = sum(len(bucket["stages"]) for bucket in written)
        written.append(_export_program(program, order, root, prefix, config.private, progress, done, total))
    if config.policy == "cmif":  # the enclave's sanitizer draws replacement tokens from the embedding table
        np.save(root / TOKEN_EMBEDDINGS, token_embeddings(examples[0][0].partition.labelled).detach().numpy())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "producer": _producer(),
        "model": about or {},
        "config": {name: getattr(examples[0][0].config, name) for name in RUNTIME_FIELDS},
        "buckets": written,
        "dynamic_axes": _dynamic_axes(written),
        "files": {f.relative_to(root).as_posix(): file_entry(f) for f in sorted(root.rglob("*")) if f.is_file()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    sign_manifest(root, signing_key)
    if new_key_file is not None:
        write_key(signing_key, new_key_file)
    return root


def load_bundle(
    path: str | Path,
    providers: list[str] | None = None,
    test_seed: int | None = None,
    gpu: str | None = None,
    tls: TlsFiles | None = None,
    key: bytes | str | Path | None = None,
    unauthenticated: bool = False,
    plaintext: bool = False,
    **options: Any,
) -> BundleSession:
    """Check and open a bundle; GPU stages run on `providers` (default: CUDA when present, else the CPU), or on
    the GPU worker at `gpu` ("grpc://HOST:PORT": `secure-split gpu-worker`, or Triton serving the stages;
    "grpcs://HOST:PORT" over TLS, with `tls` naming the worker's CA and, for mutual TLS, this client's cert and key).

    `test_seed` (tests only, never with `gpu`) makes the enclave's keys reproducible, and predictable.
    `options` are the SplitConfig fields a loader may choose (LOAD_OPTIONS, e.g. gpu_timeout_s=5); the rest
    were fixed at export.

    `key` (bytes, or the key file `export_bundle` wrote) authenticates the manifest before anything in it is
    used; `unauthenticated=True` skips that, with a warning (tests only). Either way the boundary is audited
    again (`bundle_trust.audit_loaded`), and masking "none" outside cmif needs `plaintext=True`."""
    root = Path(path)
    manifest = authenticated_manifest(root, key, unauthenticated)
    check_files(root, manifest["files"])
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise TypeError(f"load_bundle: {unknown} cannot be chosen at load time; options are {list(LOAD_OPTIONS)}")
    if tls is not None and gpu is None:
        raise ValueError("load_bundle: tls= secures the link to a GPU worker; pass gpu='grpcs://HOST:PORT' with it")
    if test_seed is not None and gpu is not None:
        raise ValueError("load_bundle: test_seed makes masks predictable; a remote GPU worker is never given them")
    config = SplitConfig(**{**manifest["config"], **options}, test_seed=test_seed, device="cpu")
    check_masking(config, plaintext)
    worker = WorkerClient(gpu, config.gpu_timeout_s, tls) if gpu is not None else None
    gpu_side = [gpu] if gpu is not None else gpu_providers(providers)
    table = root / TOKEN_EMBEDDINGS
    sanitizer = make_sanitizer(config, lambda: torch.from_numpy(np.load(table))) if config.policy == "cmif" else None
    programs = []
    for bucket in manifest["buckets"]:
        boundary, specs, on_gpu = _rebuild(root, bucket, manifest["files"], gpu_side, worker)
        audit_loaded(boundary, bucket, config)
        partition = PartitionResult(fx.GraphModule(torch.nn.Module(), fx.Graph()), boundary, specs)
        sources = [entry["source"] for entry in bucket["inputs"]]
        checks = _verifiers(root, bucket, manifest["files"], boundary) if config.verify else None
        programs.append(SplitProgram(partition, config, sources, bucket["token_inputs"], on_gpu, checks, sanitizer))
    return BundleSession(programs, manifest, gpu_side, worker)


class BundleSession:
    """A loaded bundle, called like the model (same positional and keyword tensors); returns its output tensors."""

    def __init__(
        self,
        programs: list[SplitProgram],
        manifest: dict[str, Any],
        gpu_providers: list[str],
        worker: WorkerClient | None = None,
    ) -> None:
        """`gpu_providers`: where GPU stages run (onnxruntime providers, or the worker's address); `worker`:
        the connection to a remote GPU worker, with its byte counts."""
        self.programs = programs
        self.manifest = manifest
        self.gpu_providers = gpu_providers
        self.worker = worker

    def close(self) -> None:
        """Close the connection to the GPU worker, if there is one."""
        if self.worker is not None:
            self.worker.close()

    def __enter__(self) -> BundleSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def program(self) -> SplitProgram:
        """The split of the first bucket (the only one of a single-shape bundle): its pool, its counters."""
        return self.programs[0]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        entries = self.manifest["buckets"][0]["inputs"]
        values = {e["name"]: _argument(e, args, kwargs) for e in entries}
        index, (batch, seq) = self._bucket_for(values)
        bucket = self.manifest["buckets"][index]
        flat = [_pad(values[e["name"]], e) for e in bucket["inputs"]]
        result = tree_leaves(self.programs[index].run(*flat))
        axes = self.manifest["dynamic_axes"]["outputs"]
        return tuple(_cut(result[i], axes[k], batch, seq) for k, i in enumerate(bucket["outputs"]["order"]))

    def _bucket_for(self, values: dict[str, torch.Tensor]) -> tuple[int, tuple[int, int]]:
        """The bucket that serves these inputs: their own shapes, or the smallest that holds them (padded)."""
        buckets = self.manifest["buckets"]
        for index, bucket in enumerate(buckets):
            if all(tuple(values[e["name"]].shape) == tuple(e["shape"]) for e in bucket["inputs"]):
                return index, tuple(bucket["inputs"][0]["shape"][:2])
        dynamic = self.manifest["dynamic_axes"]["inputs"]
        shapes = {tuple(values[name].shape) for name in dynamic}
        if not dynamic or len(shapes) != 1 or len(next(iter(shapes))) != 2:
            wanted = [tuple(e["shape"]) for e in buckets[0]["inputs"]]
            raise ValueError(f"bundle inputs {[tuple(v.shape) for v in values.values()]} do not fit this bundle's "
                             f"static shapes {wanted}: export one with buckets=[(batch, seq), ...]")  # fmt: skip
        batch, seq = next(iter(shapes))
        fits = [(b["batch"] * b["seq"], i) for i, b in enumerate(buckets) if b["batch"] >= batch and b["seq"] >= seq]
        if not fits:
            sizes = [(b["batch"], b["seq"]) for b in buckets]
            raise ValueError(f"no bucket of this bundle holds batch {batch} x seq {seq}; buckets: {sizes}")
        return min(fits)[1], (batch, seq)


# -- export ------------------------------------------------------------------------------------------------


def _export_program(
    program: SplitProgram,
    order: list[int] | None,
    root: Path,
    prefix: str,
    private: tuple[str, ...],
    progress: Callable[[int, int, str], None] | None,
    done: int,
    total: int,
) -> dict[str, Any]:
    """One split's stage files under `root/prefix` (`done` of `total` files written before), and its entry in
    the manifest's buckets."""
    stages = []
    for spec in program.partition.stages:
        if progress is not None:
            progress(done + len(stages), total, f"{prefix}{spec.side}/{spec.module_name}.onnx")
        stages.append(_export_stage(program, spec, root, prefix, private))
    inputs = _inputs(program)
    shape = next((e["shape"] for e in inputs if len(e["shape"]) == 2), [None, None])
    return {"batch": shape[0], "seq": shape[1], "inputs": inputs, "token_inputs": program.token_inputs,
            "stages": stages, "boundary": [_encode_node(n) for n in program.boundary.graph.nodes if n.op != "output"],
            "outputs": _outputs(program, order)}  # fmt: skip


def _fit_examples(args: tuple, kwargs: dict[str, Any], batch: int | None, seq: int | None) -> tuple[tuple, dict]:
    """The example inputs with every 2-D integer tensor repeated or cut to (batch, seq); padding is masked (0)."""
    if batch is None:
        return args, kwargs

    def fit(x: Any) -> Any:
        if not (isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point()):
            return x
        rows = x[torch.arange(batch) % x.shape[0]]
        out = torch.zeros(batch, seq, dtype=x.dtype)
        out[:, : min(seq, x.shape[1])] = rows[:, :seq]
        return out

    return tuple(fit(a) for a in args), {k: fit(v) for k, v in kwargs.items()}


def _dynamic_axes(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """Which input and output dimensions are the batch and the sequence, seen across the buckets."""
    names = [e["name"] for e in buckets[0]["inputs"]]
    if len(buckets) < 2 or "attention_mask" not in names:  # padding is only sound where a mask hides it
        return {"inputs": {}, "outputs": [{} for _ in buckets[0]["outputs"]["order"]]}
    inputs = {e["name"]: {"0": "batch", "1": "sequence"} for e in buckets[0]["inputs"] if len(e["shape"]) == 2}
    outputs = []
    for k in range(len(buckets[0]["outputs"]["order"])):
        shapes = [(b["outputs"]["shapes"][k], b["batch"], b["seq"]) for b in buckets]
        axes = {}
        for dim in range(len(shapes[0][0])):
            if all(s[dim] == batch for s, batch, _ in shapes):
                axes[str(dim)] = "batch"
            elif all(s[dim] == seq for s, _, seq in shapes):
                axes[str(dim)] = "sequence"
        outputs.append(axes)
    return {"inputs": inputs, "outputs": outputs}


def _pad(value: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """`value` zero-padded to the bucket's shape (its padding is masked by the attention mask, also padded)."""
    if str(value.dtype) != entry["dtype"]:
        raise ValueError(f"bundle input {entry['name']!r} is {value.dtype}, the bundle takes {entry['dtype']}")
    if tuple(value.shape) == tuple(entry["shape"]):
        return value
    out = torch.zeros(entry["shape"], dtype=value.dtype)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def _cut(value: torch.Tensor, axes: dict[str, str], batch: int, seq: int) -> torch.Tensor:
    for dim, axis in axes.items():
        value = value.narrow(int(dim), 0, batch if axis == "batch" else seq)
    return value


def _export_stage(
    program: SplitProgram, spec: StageSpec, root: Path, prefix: str, private: tuple[str, ...]
) -> dict[str, Any]:
    module = program.partition.stage_module(spec)
    held = _stage_parameters(program, spec)
    if spec.side == "gpu":
        _refuse_private(program, spec, private)
    call = next(n for n in program.boundary.graph.nodes if n.op == "call_module" and n.target == spec.module_name)
    names = [f"in{i}" for i in range(len(call.args))]  # neutral names: none clashes with the exporter's own
    relative = f"{prefix}{spec.side}/{spec.module_name}.onnx"
    outputs = [f"out{i}" for i in range(len(spec.outputs))]
    _write_onnx(portable(module), tuple(_example(a) for a in call.args), names, outputs, root / relative)
    bits = module.meta.get(RING_BITS) if hasattr(module, "meta") else None
    entry = {"index": spec.index, "side": spec.side, "name": spec.module_name, "file": relative,
             "inputs": list(spec.inputs), "outputs": list(spec.outputs), "onnx_inputs": names,
             "ring_bits": bits, "parameters": held,
             "num_nodes": spec.num_nodes, "flops": spec.flops}  # fmt: skip
    if call.name in program.verifiers:
        check = f"{prefix}enclave/{spec.module_name}_check.onnx"
        entry["check"] = _export_check(program.verifiers[call.name], root, check)
    return entry


def _export_check(verifier: StageVerifier, root: Path, relative: str) -> dict[str, Any]:
    """A GPU stage's verification: its transpose s -> Lᵀs as an enclave file (it holds the stage's public
    weights, in float64), and the plan. The check vectors themselves are drawn at run time, in the enclave."""
    shapes = [tuple(s) for s in verifier.out_shapes]
    example = tuple(torch.zeros(s, dtype=torch.float64) for s in shapes)
    names = [f"s{i}" for i in range(len(shapes))]
    outputs = [f"u{i}" for i in range(len(verifier.inputs_like))]
    _write_onnx(verifier.transpose, example, names, outputs, root / relative)
    return {"file": relative, "inputs": names, "width": verifier.plan.width, "reps": verifier.plan.reps,
            "out_bounds": [int(b) for b in verifier.out_bounds], "out_shapes": [list(s) for s in shapes]}  # fmt: skip


def _write_onnx(module: fx.GraphModule, example: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            module, example, dynamo=True, input_names=inputs, output_names=outputs, opset_version=OPSET,
            optimize=False, verbose=False,
        )  # fmt: skip
    onnx_program.save(str(path), external_data=_constant_bytes(module) > EXTERNAL_DATA_BYTES)


def _constant_bytes(module: fx.GraphModule) -> int:
    """The bytes of the tensors a graph reads (its weights, whether buffers or traced constants; all flat)."""
    values = [getattr(module, str(n.target)) for n in module.graph.nodes if n.op == "get_attr"]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def _example(arg: fx.Node) -> torch.Tensor:
    """A stage input of the right shape and dtype: what crosses (a cut's wire value) or the enclave's value."""
    if arg.target is mask:
        return arg.meta[CUT].empty().zero_()
    val = arg.meta["val"]
    return torch.zeros(tuple(val.shape), dtype=val.dtype)


def _stage_constants(program: SplitProgram, spec: StageSpec) -> list[fx.Node]:
    """The constants (get_attr nodes of the labelled graph) that the stage's own nodes read."""
    return [n for n in program.partition.labelled.graph.nodes
            if n.op == "get_attr" and any(u.meta.get(STAGE) == spec.index for u in n.users)]  # fmt: skip


def _stage_parameters(program: SplitProgram, spec: StageSpec) -> list[str]:
    return sorted({name for node in _stage_constants(program, spec) for name in node.meta.get(WEIGHTS, ())})


def _refuse_private(program: SplitProgram, spec: StageSpec, private: tuple[str, ...]) -> None:
    """A GPU stage file must hold no private parameter: by the program's labels or by the export's globs."""
    for node in _stage_constants(program, spec):
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
    order = order or list(range(len(leaves)))
    shapes = [list(leaf.meta["val"].shape) for leaf in tree_leaves(output.args[0])]
    return {"values": leaves, "order": order, "shapes": [shapes[i] for i in order]}


def _output_order(model: torch.nn.Module, program: SplitProgram, args: tuple, kwargs: dict | None) -> list[int]:
    """Graph outputs in the model's own output order, matched by value on the example inputs."""
    flat = [_argument(entry, args, kwargs or {}) for entry in _inputs(program)]
    with torch.no_grad():
        expected = [t for t in tree_leaves(model(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
        got = list(tree_leaves(program.run(*flat)))
    order: list[int] = []
    for want in expected:  # the nearest unused output of the same shape (masks leave a small error)
        match = [i for i, t in enumerate(got) if i not in order and t.shape == want.shape]
        if match:
            order.append(min(match, key=lambda i: (got[i].double() - want.double()).abs().max().item()))
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
    name = argument_name(source)
    if name is None:
        raise NotImplementedError(f"graph input {source!r} is not a plain argument of the model: cannot bundle it")
    return name



# -- load --------------------------------------------------------------------------------------------------


def _rebuild(
    root: Path, bucket: dict[str, Any], files: dict[str, dict[str, Any]], gpu: list[str], worker: WorkerClient | None
) -> tuple[fx.GraphModule, list[StageSpec], dict[str, torch.nn.Module]]:
    """The boundary graph, calling one OnnxStage per stage file (CPU copies for the enclave's own use), and
    what the GPU runs: sessions on its providers, opened now (a provider that cannot serve them fails here),
    or the worker's stages."""
    holder, graph = torch.nn.Module(), fx.Graph()
    env: dict[str, fx.Node] = {}
    specs, on_gpu = [], {}
    for stage in bucket["stages"]:
        digest, path = file_digest(files, stage["file"]), root / stage["file"]
        names, bits = stage["onnx_inputs"], stage["ring_bits"]
        holder.add_module(stage["name"], OnnxStage(path, [CPU], digest, names, bits))
        if stage["side"] == "gpu" and worker is not None:
            on_gpu[stage["name"]] = RemoteStage(worker, model_name(stage["file"]), names)
        elif stage["side"] == "gpu":
            on_gpu[stage["name"]] = OnnxStage(path, gpu, digest, names, bits)
            on_gpu[stage["name"]].open()
        specs.append(StageSpec(stage["index"], stage["side"], stage["name"], tuple(stage["inputs"]),
                               tuple(stage["outputs"]), stage["num_nodes"], stage["flops"]))  # fmt: skip
    for entry in bucket["boundary"]:
        env[entry["name"]] = _decode_node(graph, entry, env)
    values = bucket["outputs"]["values"]
    graph.output(tuple(env[v] for v in values))
    return fx.GraphModule(holder, graph, "SplitBoundary"), specs, on_gpu


def _verifiers(
    root: Path, bucket: dict[str, Any], files: dict[str, dict[str, Any]], boundary: fx.GraphModule
) -> dict[str, StageVerifier]:
    """The checks of every GPU stage call (verify=True), from the transposes and plans the export wrote; a plan
    sound to fewer bits than the program would have asked for is refused."""
    calls = {str(n.target): n for n in boundary.graph.nodes if n.op == "call_module"}
    gpu_calls = sum(n.op == "call_module" and n.meta[SIDE] == "gpu" for n in boundary.graph.nodes)
    verifiers = {}
    for stage in bucket["stages"]:
        if stage["side"] != "gpu":
            continue
        check = stage.get("check")
        if check is None:
            raise BundleError(f"{stage['file']}: no verification file: export the bundle with SplitConfig(verify=True)")
        call = calls[stage["name"]]
        transpose = OnnxStage(root / check["file"], [CPU], file_digest(files, check["file"]), check["inputs"], None)
        plan = check_plan(check, stage["name"], gpu_calls)
        like = [a.meta[CUT].empty().zero_() for a in call.args]
        shapes = [tuple(shape) for shape in check["out_shapes"]]
        verifiers[call.name] = StageVerifier(stage["name"], transpose, plan, check["out_bounds"], shapes, like)
    return verifiers


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
