"""Why the enclave may trust a split bundle: a key authenticates it, and the loader audits it again.

A bundle may sit on storage the GPU host can write. Its `manifest.json` lists the size and sha256 of every other
file, so one HMAC-SHA256 over the manifest's exact bytes, kept beside it in `manifest.json.hmac`, authenticates
the whole bundle under a key that only the enclave side holds: `export_bundle` signs with it and writes a fresh
one to `<bundle>.key` (mode 0600, outside the bundle) unless given one. The GPU worker reads the manifest
without any key: it never needs to trust it.

Authentication says the bundle is the one its exporter wrote. The re-audit says that no manifest, authentic or
edited, makes the enclave send user data less protected than the masking requires: `audit_loaded` recomputes
taint through the rebuilt boundary with every stage opaque (`leak_audit.audit_boundary`) and checks each cut's
shape against its GPU stage file, and `check_plan` recomputes each verification plan's soundness from its width,
repetitions and output bounds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import fx

from secure_split.enclave_runtime.integrity import CheckPlan, required_bits
from secure_split.passes.insert_masks import Cut
from secure_split.passes.label import GPU
from secure_split.passes.leak_audit import LeakError, audit_boundary, opaque_stage_taints
from secure_split.passes.meta import CUT, SIDE
from secure_split.runtime.manifest import MANIFEST, MAX_MANIFEST_BYTES, TAG, BundleError, parse_manifest, read_capped

from .config import SplitConfig

KEY_BYTES = 32
MIN_KEY_BYTES = 16
_KEY_ID = b"secure_split.bundle key id"  # a key's public name: the HMAC of this label under it
log = logging.getLogger("secure_split")


def key_path(root: Path) -> Path:
    """Where `export_bundle` writes a fresh key for the bundle at `root`: beside it, `<bundle>.key`."""
    return root.with_name(root.name + ".key")


def export_key(key: bytes | str | Path | None, root: Path) -> tuple[bytes, Path | None]:
    """The key that signs the bundle at `root`, and where to write it once the bundle is written (None: it is
    kept already): `key` itself (bytes), the key in the file `key` names, or a fresh one for that file (None:
    `key_path(root)`, which must not exist yet). Checked before the export's work, written after it, so that a
    failed export leaves no key behind."""
    if isinstance(key, bytes):
        return _checked(key, "key"), None
    path = key_path(root) if key is None else Path(key)
    if path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path}: a bundle's key is kept outside the bundle it authenticates")
    if key is not None and path.exists():
        return read_key(path), None
    if path.exists() or path.is_symlink():
        raise FileExistsError(_KEY_EXISTS.format(path=path))
    return os.urandom(KEY_BYTES), path


def write_key(key: bytes, path: Path) -> None:
    """A fresh key file, readable by its owner only; never over an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as error:
        raise FileExistsError(_KEY_EXISTS.format(path=path)) from error
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    log.info("secure_split: wrote a bundle key to %s; load_bundle needs it (key=...)", path)


_KEY_EXISTS = ("{path} exists: pass export_bundle(..., key='{path}') to sign with that key, or remove it for a "
               "fresh one")  # fmt: skip


def read_key(key: bytes | str | Path) -> bytes:
    """A key given as bytes, or as the path of a key file (the key in hex)."""
    if isinstance(key, bytes):
        return _checked(key, "key")
    path = Path(key)
    try:
        material = bytes.fromhex(read_capped(path, 4096).decode("ascii"))
    except (BundleError, UnicodeDecodeError, ValueError) as error:
        raise BundleError(f"{path}: not a bundle key file (one line of hex): {error}") from error
    return _checked(material, str(path))


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{where}: a bundle key has at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def sign_manifest(root: Path, key: bytes) -> None:
    """Write `manifest.json.hmac`: the HMAC-SHA256 of the manifest's exact bytes, and which key made it."""
    tag = {"algorithm": "hmac-sha256", "key_id": _key_id(key), "tag": _tag(key, (root / MANIFEST).read_bytes())}
    (root / TAG).write_text(json.dumps(tag) + "\n")


def authenticated_manifest(root: Path, key: bytes | str | Path | None, unauthenticated: bool) -> dict[str, Any]:
    """The manifest of the bundle at `root`, parsed only once its tag checks under `key`; or, with
    `unauthenticated` (and no key), parsed unchecked, with a warning."""
    if key is not None and unauthenticated:
        raise TypeError("load_bundle: pass key=... or unauthenticated=True, not both")
    data = read_capped(root / MANIFEST, MAX_MANIFEST_BYTES)  # read once: the bytes checked are the bytes parsed
    if key is not None:
        _check_tag(root, read_key(key), data)
    elif unauthenticated:
        log.warning("secure_split: bundle %s loaded WITHOUT authentication (unauthenticated=True): whoever could "
                    "write it may have edited it; only the re-audit stands between it and a leak", root)  # fmt: skip
    else:
        raise BundleError(f"{root}: load_bundle needs the bundle's key to authenticate it: key=<key file> "
                          f"(export_bundle wrote {key_path(root)} unless given one) or key=<bytes>; "
                          "unauthenticated=True skips the check (tests only, never in deployment)")  # fmt: skip
    return parse_manifest(data, root / MANIFEST)


def _check_tag(root: Path, key: bytes, data: bytes) -> None:
    path = root / TAG
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"{path}: missing: the manifest is not authenticated (exported without a key, or the "
                          "tag was removed)")  # fmt: skip
    try:
        tag = json.loads(read_capped(path, 4096))
        key_id, expected = tag["key_id"], tag["tag"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as error:
        raise BundleError(f"{path}: not a bundle tag ({error})") from error
    if not isinstance(key_id, str) or not hmac.compare_digest(key_id.encode(), _key_id(key).encode()):
        raise BundleError(f"{path}: the bundle was signed with another key than the one given (wrong key)")
    if not isinstance(expected, str) or not hmac.compare_digest(expected.encode(), _tag(key, data).encode()):
        raise BundleError(f"{path}: the HMAC of {MANIFEST} does not match: the manifest was edited after export")


def _tag(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _key_id(key: bytes) -> str:
    return _tag(key, _KEY_ID)[:16]


def audit_loaded(boundary: fx.GraphModule, bucket: dict[str, Any], config: SplitConfig) -> None:
    """Re-derive, trusting no label of the manifest, what the boundary rebuilt from `bucket` must protect, and
    refuse it (`LeakError`, `BundleError`) where a cut or stage falls short. Every stage is opaque: a value is
    private if any of its stage's arguments is (graph inputs are, but those `config.public_inputs` declares),
    and an enclave stage that holds parameters may hold private ones."""
    entries = {stage["name"]: stage for stage in bucket["stages"]}
    for call in (n for n in boundary.graph.nodes if n.op == "call_module"):
        side = entries[str(call.target)]["side"]
        if call.meta[SIDE] != side:
            raise BundleError(f"{call.target}: the boundary runs it on the {call.meta[SIDE]} side, its stage entry "
                              f"says {side!r}")  # fmt: skip

    def stage_taints(call: fx.Node, taints: list[str]) -> list[str]:
        stage = entries[str(call.target)]
        return opaque_stage_taints(taints, len(stage["outputs"]), stage["side"] != GPU and bool(stage["parameters"]))

    placeholders = [n.name for n in boundary.graph.nodes if n.op == "placeholder"]
    named = zip(placeholders, bucket["inputs"], strict=True)
    public = frozenset(p for p, entry in named if entry["name"] in config.public_inputs)
    audit_boundary(boundary, config.masking, config.policy, stage_taints, public)
    _check_cut_shapes(boundary)


def _check_cut_shapes(boundary: fx.GraphModule) -> None:
    """Every cut has the shape its GPU stage file declares: a mask drawn for another shape would not cover the
    value it hides. The reference is the enclave's own copy of the file (its digest checked)."""
    for call in (n for n in boundary.graph.nodes if n.op == "call_module" and n.meta[SIDE] == GPU):
        stage = boundary.get_submodule(str(call.target))
        declared = {i.name: i.shape for i in stage.open().get_inputs()}  # inputs nothing reads are dropped
        outputs = [o.shape for o in stage.open().get_outputs()]
        crossing = [(a, declared.get(name)) for a, name in zip(call.args, stage.input_names, strict=True)]
        crossing += [(back, outputs[item.args[1]]) for item in call.users for back in item.users]
        for node, shape in crossing:
            cut: Cut = node.meta[CUT]
            if shape is not None and list(cut.shape) != list(shape):
                raise LeakError(f"cut {cut.index} {cut.name!r}: crosses as {list(cut.shape)}, where {call.target} "
                                f"declares {list(shape)}")  # fmt: skip


def check_masking(config: SplitConfig, plaintext: bool) -> None:
    """Masking "none" outside cmif sends activations in the clear: a baseline the loader asks for by name."""
    if config.plaintext and not plaintext:
        raise BundleError(f"the bundle's masking is 'none' under policy {config.policy!r}: activations would cross "
                          "to the GPU in plaintext; load_bundle(..., plaintext=True) runs this baseline")  # fmt: skip


def check_plan(check: dict[str, Any], stage: str, gpu_calls: int) -> CheckPlan:
    """A GPU stage's verification plan as its manifest entry gives it, refused unless it is sound to the bits
    verify=True asks of each of a call's `gpu_calls` stages."""
    width, reps, bounds = check["width"], check["reps"], check["out_bounds"]
    numbers = [width, reps, *bounds] if isinstance(bounds, list) else [None]
    if not all(type(n) is int for n in numbers) or not 1 <= width <= 62 or not bounds or min(bounds) < 1:
        raise BundleError(f"{stage}: malformed verification plan (width {width!r}, reps {reps!r}, bounds {bounds!r})")
    plan = CheckPlan.for_bounds(width, reps, bounds)
    if plan.soundness_bits < required_bits(gpu_calls):
        raise BundleError(f"{stage}: its check is sound to {plan.soundness_bits} bits; verify=True needs "
                          f"{required_bits(gpu_calls)} for each of {gpu_calls} GPU stage calls")  # fmt: skip
    return plan
