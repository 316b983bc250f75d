"""A split bundle's manifest as both sides read it: schema check, file digests, and the GPU stages' model names.

The GPU worker reads the manifest too, so this module is on the untrusted side and needs nothing else. It reads
no key: the enclave authenticates the manifest (`secure_split.bundle`, `manifest.json.hmac`) before it trusts it,
and both sides check every file it names the same way (`check_files`): inside the bundle, no symbolic link on
the way, its recorded size under a cap, then its sha256."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT, VERSION = "secure_split.bundle", 2
MANIFEST, TAG = "manifest.json", "manifest.json.hmac"
MAX_FILE_BYTES = 1 << 36  # 64 GiB: far above any stage's weights; a file that claims more is refused unread
MAX_MANIFEST_BYTES = 1 << 26


class BundleError(ValueError):
    """A bundle directory is refused: a file is missing or altered, or the manifest does not fit the schema."""


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the bundle at `root`, checked against the schema (not authenticated: see the module)."""
    return parse_manifest(read_capped(root / MANIFEST, MAX_MANIFEST_BYTES), root / MANIFEST)


def parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """The manifest in `data` (the bytes of `path`), checked against the schema."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not a readable manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        version = manifest.get("version")
        raise BundleError(f"{path}: a manifest of version {version!r}; this secure_split reads version {VERSION} "
                          "only (authenticated, with file sizes): export the bundle again")  # fmt: skip
    required = ("producer", "config", "buckets", "dynamic_axes", "files")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {missing}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(_is_entry(e) for e in files.values()):
        raise BundleError(f"{path}: `files` must map each file to its {{'sha256': hex, 'size': bytes}}")
    return manifest


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and type(entry.get("size")) is int and entry["size"] >= 0)  # fmt: skip


def read_capped(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path` (not a symbolic link), refused unread when larger than `limit`."""
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{path}: missing, or not a regular file")
    size = path.stat().st_size
    if size > limit:
        raise BundleError(f"{path}: {size} bytes, more than the {limit} a bundle allows")
    return path.read_bytes()


def file_entry(path: Path) -> dict[str, Any]:
    """What the manifest records of one file."""
    return {"sha256": sha256(path), "size": path.stat().st_size}


def bundle_file(root: Path, relative: Any) -> Path:
    """`root / relative` for a manifest file name that stays inside the bundle and crosses no symbolic link."""
    if not isinstance(relative, str) or not relative or "\\" in relative or "\0" in relative:
        raise BundleError(f"{root}: manifest file name {relative!r} is not a relative POSIX path")
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or relative != "/".join(parts):
        raise BundleError(f"{root}: manifest file name {relative!r} leaves the bundle directory")
    path = root
    for part in parts:  # a link anywhere on the way could point outside the bundle
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{path}: a symbolic link; a bundle holds regular files only")
    return path


def check_files(root: Path, files: dict[str, dict[str, Any]], only: Iterable[str] | None = None) -> None:
    """Every listed file (or those among `only`) is present with its size and digest; with `only` None, nothing
    else is. Sizes are checked before anything is read."""
    for relative in files if only is None else only:
        path = bundle_file(root, relative)
        if relative not in files:
            raise BundleError(f"{path}: not listed in the manifest")
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        size, entry = path.stat().st_size, files[relative]
        if size != entry["size"] or size > MAX_FILE_BYTES:
            raise BundleError(f"{path}: {size} bytes, the manifest records {entry['size']} "
                              f"(at most {MAX_FILE_BYTES} allowed): refused before hashing")  # fmt: skip
        if sha256(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 does not match the manifest (altered file)")
    if only is not None:
        return
    extra = [f for f in root.rglob("*") if (f.is_file() or f.is_symlink()) and f.relative_to(root).as_posix()
             not in (*files, MANIFEST, TAG)]  # fmt: skip
    if extra:
        raise BundleError(f"{extra[0]}: not listed in the manifest")


def file_digest(files: dict[str, dict[str, Any]], relative: str) -> str:
    """The sha256 the manifest records for a file the bundle's stages name."""
    if relative not in files:
        raise BundleError(f"{relative}: named by a stage but not listed in the manifest's files")
    return files[relative]["sha256"]


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
    """A stage's ONNX file (listed or not: `check_files` refuses it then) and its external-data file, if any."""
    data = stage["file"] + ".data"
    return [stage["file"], *([data] if data in manifest["files"] else [])]


def model_name(file: str) -> str:
    """The name a GPU stage is served under (worker and Triton): "b2_t16/gpu/stage1_gpu.onnx" -> "b2_t16_stage1_gpu"."""
    parts = [p for p in PurePosixPath(file).with_suffix("").parts if p != "gpu"]
    return "_".join(parts)
