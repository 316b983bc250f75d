"""Loading a bundle: `load_bundle` authenticates and re-audits it and returns a `BundleSession`, which is called
like the model: inputs are padded to the smallest bucket that holds them, and outputs cut back.

What a bundle holds is described in `bundle_codec`; how it is written, in `bundle_export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from secure_split.enclave_runtime.integrity import StageVerifier
from secure_split.passes.meta import CUT, SIDE
from secure_split.runtime.manifest import BundleError, check_files
from secure_split.runtime.remote import WorkerClient
from secure_split.runtime.tls import TlsFiles

from .buckets import pad_to
from .bundle_codec import argument, decode_bucket
from .bundle_export import TOKEN_EMBEDDINGS
from .bundle_trust import audit_loaded, authenticated_manifest, check_masking, check_plan
from .config import SplitConfig
from .onnx_stage import CPU, OnnxStage, gpu_providers
from .program import SplitProgram, make_sanitizer


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
    `options` are the runtime settings a loader may choose (`SplitConfig.load_settings()`, e.g. gpu_timeout_s=5);
    the rest were fixed at export.

    `key` (bytes, or the key file `export_bundle` wrote) authenticates the manifest before anything in it is
    used; `unauthenticated=True` skips that, with a warning (tests only). Either way the boundary is audited
    again (`bundle_trust.audit_loaded`), and masking "none" outside cmif needs `plaintext=True`."""
    root = Path(path)
    manifest = authenticated_manifest(root, key, unauthenticated)
    check_files(root, manifest["files"])
    choosable = SplitConfig.load_settings()
    unknown = sorted(set(options) - set(choosable))
    if unknown:
        raise TypeError(f"load_bundle: {unknown} cannot be chosen at load time; options are {list(choosable)}")
    if tls is not None and gpu is None:
        raise ValueError("load_bundle: tls= secures the link to a GPU worker; pass gpu='grpcs://HOST:PORT' with it")
    if test_seed is not None and gpu is not None:
        raise ValueError("load_bundle: test_seed makes masks predictable; a remote GPU worker is never given them")
    config = SplitConfig(**{**manifest["config"], **options}, test_seed=test_seed, device="cpu")
    check_masking(config, plaintext)
    worker = WorkerClient(gpu, config.gpu_timeout_s, tls) if gpu is not None else None
    gpu_side = [gpu] if gpu is not None else gpu_providers(providers)
    table = root / TOKEN_EMBEDDINGS
    sanitizer = make_sanitizer(config, lambda: torch.from_numpy(np.load(table))) if config.sanitizes_tokens else None
    programs = []
    for bucket in manifest["buckets"]:
        artifact, on_gpu = decode_bucket(root, bucket, manifest["files"], config, gpu_side, worker)
        audit_loaded(artifact.boundary, bucket, config)
        checks = _verifiers(root, bucket, manifest["files"], artifact.boundary) if config.verify else None
        programs.append(SplitProgram(artifact, on_gpu, checks, sanitizer))
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
        values = {e["name"]: argument(e, args, kwargs) for e in entries}
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
        transpose = OnnxStage(root / check["file"], [CPU], check["inputs"])
        plan = check_plan(check, stage["name"], gpu_calls)
        like = [a.meta[CUT].zeros() for a in call.args]
        shapes = [tuple(shape) for shape in check["out_shapes"]]
        verifiers[call.name] = StageVerifier(stage["name"], transpose, plan, check["out_bounds"], shapes, like)
    return verifiers


def _pad(value: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """`value` zero-padded to the bucket's shape (its padding is masked by the attention mask, also padded)."""
    if str(value.dtype) != entry["dtype"]:
        raise ValueError(f"bundle input {entry['name']!r} is {value.dtype}, the bundle takes {entry['dtype']}")
    return pad_to(value, entry["shape"])


def _cut(value: torch.Tensor, axes: dict[str, str], batch: int, seq: int) -> torch.Tensor:
    for dim, axis in axes.items():
        value = value.narrow(int(dim), 0, batch if axis == "batch" else seq)
    return value
