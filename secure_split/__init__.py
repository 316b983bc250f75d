"""secure_split: a PyTorch compiler plugin for confidential split inference.

    torch.compile(model, backend="secure_split", fullgraph=True, options={"frac_bits": 20})

The public names load lazily, so that importing the untrusted `secure_split.runtime` (a GPU worker) never
loads the trusted side (`secure_split.enclave_runtime`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BoundaryTrace": ".trace",
    "BundleError": ".runtime.manifest",
    "BundleSession": ".bundle",
    "IntegrityError": ".enclave_runtime.integrity",
    "MaskReuseError": ".enclave_runtime.pool",
    "PoolEmptyError": ".enclave_runtime.keys",
    "PoolError": ".enclave_runtime.pool",
    "RingOverflowError": ".passes.ring",
    "PartitionReport": ".report",
    "SplitConfig": ".config",
    "SplitProgram": ".program",
    "last_program": ".program",
    "SplitGenerator": ".generation",
    "WorkerError": ".runtime.stage_backend",
    "export_bundle": ".bundle_export",
    "generate": ".generation",
    "load_bundle": ".bundle",
    "make_token_sanitizer": ".enclave_runtime.sanitizer",
    "secure_split_backend": ".backend",
    "split": ".api",
    "trace_boundary": ".trace",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'secure_split' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
