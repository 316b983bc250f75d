"""Writing a bundle: `export_bundle` compiles the model (a split per bucket) and saves each split's stages as
ONNX files, its artifact as the signed manifest (`bundle_codec`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from secure_split.enclave_runtime.integrity import StageVerifier
from secure_split.partitioner.stages import StageSpec
from secure_split.passes.insert_masks import mask
from secure_split.passes.label_cmif import token_embeddings
from secure_split.passes.leak_audit import LeakError
from secure_split.passes.meta import CUT, PARAM_NAMES, PRIVATE_PARAM
from secure_split.passes.onnx_lower import portable
from secure_split.runtime.manifest import FORMAT, MANIFEST, VERSION, file_entry

from .artifact import stage_constants
from .bundle_codec import argument, encode_bucket, encode_inputs
from .bundle_trust import export_key, sign_manifest, write_key
from .config import SplitConfig
from .program import SplitProgram

OPSET = 18
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
            program = split(model, bucket_args, bucket_kwargs, config)
            order = _output_order(model, program, bucket_args, bucket_kwargs)
            examples.append((program, order, f"b{batch}_t{seq}/" if buckets else ""))
    config = config or examples[0][0].config
    total = sum(len(p.artifact.stages) for p, _, _ in examples)
    written: list[dict[str, Any]] = []
    for program, order, prefix in examples:
        done = sum(len(bucket["stages"]) for bucket in written)
        written.append(_export_program(program, order, root, prefix, config.private, progress, done, total))
    if config.sanitizes_tokens:  # the enclave's sanitizer draws replacement tokens from the embedding table
        np.save(root / TOKEN_EMBEDDINGS, token_embeddings(_labelled(examples[0][0])).detach().numpy())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "producer": _producer(),
        "model": about or {},
        "config": {name: getattr(examples[0][0].config, name) for name in SplitConfig.kept_settings()},
        "buckets": written,
        "dynamic_axes": _dynamic_axes(written),
        "files": {f.relative_to(root).as_posix(): file_entry(f) for f in sorted(root.rglob("*")) if f.is_file()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    sign_manifest(root, signing_key)
    if new_key_file is not None:
        write_key(signing_key, new_key_file)
    return root


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
    for spec in program.artifact.stages:
        if progress is not None:
            progress(done + len(stages), total, f"{prefix}{spec.side}/{spec.module_name}.onnx")
        stages.append(_export_stage(program, spec, root, prefix, private))
    return encode_bucket(program.artifact, stages, order)


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


def _export_stage(
    program: SplitProgram, spec: StageSpec, root: Path, prefix: str, private: tuple[str, ...]
) -> dict[str, Any]:
    artifact = program.artifact
    module, facts = artifact.stage_module(spec), artifact.facts[spec.module_name]
    if spec.side == "gpu":
        _refuse_private(_labelled(program), spec, private)
    call = next(n for n in artifact.boundary.graph.nodes if n.op == "call_module" and n.target == spec.module_name)
    names = [f"in{i}" for i in range(len(call.args))]  # neutral names: none clashes with the exporter's own
    relative = f"{prefix}{spec.side}/{spec.module_name}.onnx"
    outputs = [f"out{i}" for i in range(len(spec.outputs))]
    _write_onnx(portable(module), tuple(_example(a) for a in call.args), names, outputs, root / relative)
    entry = {"index": spec.index, "side": spec.side, "name": spec.module_name, "file": relative,
             "inputs": list(spec.inputs), "outputs": list(spec.outputs), "onnx_inputs": names,
             "ring_bits": facts.ring_bits, "parameters": list(facts.parameters),
             "num_nodes": spec.num_nodes, "flops": spec.flops}  # fmt: skip
    verifiers = program.keys.verifiers if program.keys is not None else {}
    if call.name in verifiers:
        check = f"{prefix}enclave/{spec.module_name}_check.onnx"
        entry["check"] = _export_check(verifiers[call.name], root, check)
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
        return arg.meta[CUT].zeros()
    val = arg.meta["val"]
    return torch.zeros(tuple(val.shape), dtype=val.dtype)


def _refuse_private(labelled: fx.GraphModule, spec: StageSpec, private: tuple[str, ...]) -> None:
    """A GPU stage file must hold no private parameter: by the program's labels or by the export's globs."""
    for node in stage_constants(labelled, spec.index):
        names = node.meta.get(PARAM_NAMES, ())
        if node.meta.get(PRIVATE_PARAM) or any(fnmatchcase(n, g) for n in names for g in private):
            raise LeakError(f"gpu/{spec.module_name}.onnx would carry private parameter(s) {list(names)}: refused")


def _labelled(program: SplitProgram) -> fx.GraphModule:
    """The labelled graph a bundle is written from (a compiled program's; a loaded one has none)."""
    if program.artifact.labelled is None:
        raise ValueError("export_bundle needs a compiled program (from split()); this one was loaded from a bundle")
    return program.artifact.labelled


def _output_order(model: torch.nn.Module, program: SplitProgram, args: tuple, kwargs: dict | None) -> list[int]:
    """Graph outputs in the model's own output order, matched by value on the example inputs."""
    flat = [argument(entry, args, kwargs or {}) for entry in encode_inputs(program.artifact)]
    with torch.no_grad():
        expected = [t for t in tree_leaves(model(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
        got = list(tree_leaves(program.run(*flat)))
    order: list[int] = []
    for want in expected:  # the nearest unused output of the same shape (masks leave a small error)
        match = [i for i, t in enumerate(got) if i not in order and t.shape == want.shape]
        if match:
            order.append(min(match, key=lambda i: (got[i].double() - want.double()).abs().max().item()))
    return order + [i for i in range(len(got)) if i not in order]


def _producer() -> dict[str, Any]:
    import onnx

    from . import __version__

    return {"secure_split": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET}
