"""The enclave's cryptographically secure generator: an AES-256-CTR keystream turned into tensors."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_PI = 2.0 * math.pi


class CSPRNG:
    """AES-256-CTR keystream, keyed from `os.urandom`.

    The stream never rewinds: every draw is fresh bytes, so two draws never share a mask. `test_seed` (tests
    only) derives the key from a public label instead, so anyone who knows it can rebuild every draw; `domain`
    then keeps streams of one seed apart (the sanitizer's noise and each program's masks differ).
    """

    def __init__(self, domain: str = "csprng", test_seed: int | None = None) -> None:
        label = f"secure_split/insecure-test-seed/{domain}/{test_seed}".encode()
        key = os.urandom(32) if test_seed is None else hashlib.sha256(label).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
        self.bytes_drawn = 0

    def random_bytes(self, n: int) -> bytes:
        self.bytes_drawn += n
        return self._stream.update(b"\x00" * n)

    def integers(self, shape: tuple[int, ...]) -> torch.Tensor:
        """int64 values uniform over Z_2^64 (every bit from the keystream)."""
        words = np.frombuffer(self.random_bytes(8 * math.prod(shape)), dtype=np.int64)
        return torch.from_numpy(words.copy()).reshape(shape)

    def uniform(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n values uniform in (0, 1], with the dtype's full precision: 24 random bits each for float32, 53 for
        float64."""
        if dtype == torch.float64:
            words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64) >> np.uint64(11)
            return (torch.from_numpy(words.astype(np.int64)).to(torch.float64) + 1.0) * 2.0**-53
        words = np.frombuffer(self.random_bytes(4 * n), dtype=np.uint32) >> np.uint32(8)
        return (torch.from_numpy(words.astype(np.int32)).to(torch.float32) + 1.0) * 2.0**-24

    def gaussian(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normal(0, std²) samples by the Box–Muller transform on keystream uniforms (tails cut at 5.8σ)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius = torch.sqrt(-2.0 * torch.log(u[:half])).mul_(std)
        angle = u[half:].mul_(_TWO_PI)
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return z.to(dtype).reshape(shape)
