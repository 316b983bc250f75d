"""The offline pool of per-call keys (masks and unmask terms), used once each, and its sealed storage.

Slalom's offline phase: the masks of a future call and their unmask terms L(r) depend on no input, so the
enclave computes them ahead of time. Each call's keys carry a serial number from a monotonic counter; a call
takes the oldest entry, and the pool refuses any entry whose serial was used before. Sealing
encrypts the pool with AES-256-GCM under a key that never leaves the enclave, bound to the program it was made
for; a tampered file fails authentication and a file whose serials were already loaded or used is a replay.
"""

from __future__ import annotations

import io
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_MAGIC = b"secure_split/pool/v1\n"


class MaskReuseError(RuntimeError):
    """Keys (a one-time mask and its term) would be used a second time."""


class PoolError(RuntimeError):
    """A sealed pool file is refused: tampered, made for another program or key, or replayed."""


@dataclass
class CallKeys:
    """Everything one call needs from the enclave's secrets, by boundary node name."""

    serial: int
    masks: dict[str, torch.Tensor]
    terms: dict[str, tuple[torch.Tensor, ...]]
    checks: dict[str, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.masks.values())
        for group in [*self.terms.values(), *(t for checks in self.checks.values() for t in checks)]:
            out.extend(group)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def destroy(self) -> None:
        """Overwrite every secret in place, then drop them."""
        for t in self.tensors():
            t.zero_()
        self.masks, self.terms, self.checks = {}, {}, {}


class KeyPool:
    """Per-call keys, oldest first. `take()` hands one out once; the serial counter only moves forward."""

    def __init__(self, sealing_key: bytes | None = None) -> None:
        self._sealing_key = sealing_key or AESGCM.generate_key(bit_length=256)
        self._entries: deque[CallKeys] = deque()
        self._next_serial = 0
        self._used: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def new_serial(self) -> int:
        self._next_serial += 1
        return self._next_serial

    def add(self, keys: CallKeys) -> None:
        self._entries.append(keys)

    def take(self) -> CallKeys | None:
        """The oldest unused entry, removed from the pool; None when empty."""
        if not self._entries:
            return None
        return self._entries.popleft()

    def mark_used(self, keys: CallKeys) -> None:
        """Refuse keys whose serial was used before (a second use, or a copy), then record them."""
        if keys.serial in self._used:
            raise MaskReuseError(f"keys #{keys.serial} were used before: a one-time mask would be reused")
        self._used.add(keys.serial)

    def save(self, path: str | Path, fingerprint: bytes) -> int:
        """Seal every entry to `path`, bound to the program's `fingerprint`, and empty the pool; returns a count."""
        entries = list(self._entries)
        buffer = io.BytesIO()
        torch.save([_as_dict(e) for e in entries], buffer)
        nonce = os.urandom(12)
        sealed = AESGCM(self._sealing_key).encrypt(nonce, buffer.getvalue(), _MAGIC + fingerprint)
        Path(path).write_bytes(_MAGIC + nonce + sealed)
        self._entries.clear()
        return len(entries)

    def load(self, path: str | Path, fingerprint: bytes) -> int:
        """Unseal `path` into the pool; refuse tampering, another program's pool, or a replay. Returns a count."""
        blob = Path(path).read_bytes()
        if not blob.startswith(_MAGIC):
            raise PoolError(f"{path}: not a sealed secure_split pool")
        nonce, sealed = blob[len(_MAGIC) : len(_MAGIC) + 12], blob[len(_MAGIC) + 12 :]
        try:
            plain = AESGCM(self._sealing_key).decrypt(nonce, sealed, _MAGIC + fingerprint)
        except InvalidTag:
            raise PoolError(
                f"{path}: authentication failed: the file was altered, or sealed by another enclave key or for "
                "another program"
            ) from None
        entries = [CallKeys(**d) for d in torch.load(io.BytesIO(plain), weights_only=True)]
        self._refuse_replay(path, entries)
        self._entries.extend(entries)
        return len(entries)

    def _refuse_replay(self, path: str | Path, entries: list[CallKeys]) -> None:
        held = {e.serial for e in self._entries}
        if any(e.serial in self._used or e.serial in held for e in entries):
            raise PoolError(f"{path}: replayed pool: these keys were already loaded or used; a mask is used once")


def _as_dict(keys: CallKeys) -> dict:
    return {"serial": keys.serial, "masks": keys.masks, "terms": keys.terms, "checks": keys.checks}
