"""A split bundle's manifest as both sides read it: schema check, file digests, and the GPU stages' model names.

The GPU worker reads the manifest too, so this module is on the untrusted side and needs nothing else."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT, VERSION = "secure_split.bundle", 1


class BundleError(ValueError):
    """A bundle directory is refused: a file is missing or altered, or the manifest does not fit the schema."""


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not a readable manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleError(f"{path}: not a {FORMAT} manifest of version {VERSION}")
    required = ("producer", "config", "buckets", "dynamic_axes", "files")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {missing}")
    return manifest


def check_files(root: Path, files: dict[str, str], only: Iterable[str] | None = None) -> None:
    """Every listed file (or those among `only`) is present with its digest; with `only` None, nothing else is."""
    for relative in files if only is None else only:
        path = root / relative
        if relative not in files:
            raise BundleError(f"{path}: not listed in the manifest")
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        if sha256(path) != files[relative]:
            raise BundleError(f"{path}: sha256 does not match the manifest (altered file)")
    if only is not None:
        return
    extra = [f for f in root.rglob("*") if f.is_file() and f.name != "manifest.json" and
             str(f.relative_to(root)) not in files]  # fmt: skip
    if extra:
        raise BundleError(f"{extra[0]}: not listed in the manifest")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gpu_stages(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU stage entries of every bucket."""
    return [stage for bucket in manifest["buckets"] for stage in bucket["stages"] if stage["side"] == "gpu"]


def stage_files(manifest: dict[str, Any], stage: dict[str, Any]) -> list[str]:
    """A stage's ONNX file and its external-data file, if it has one."""
    return [name for name in manifest["files"] if name in (stage["file"], stage["file"] + ".data")]


def model_name(file: str) -> str:
    """The name a GPU stage is served under (worker and Triton): "b2_t16/gpu/stage1_gpu.onnx" -> "b2_t16_stage1_gpu"."""
    parts = [p for p in PurePosixPath(file).with_suffix("").parts if p != "gpu"]
    return "_".join(parts)
