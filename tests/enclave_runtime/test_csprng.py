"""The enclave's mask generator: AES-CTR keystream keyed from the OS, reproducible only under a test seed."""

import math

import torch

from secure_split.enclave_runtime.csprng import CSPRNG
from secure_split.enclave_runtime.masking import FloatMasking, RingMasking
from secure_split.passes.insert_masks import Cut


def test_test_seeded_streams_reproduce_and_unseeded_differ():
    assert CSPRNG(test_seed=7).random_bytes(64) == CSPRNG(test_seed=7).random_bytes(64)
    assert CSPRNG(test_seed=7).random_bytes(64) != CSPRNG(test_seed=8).random_bytes(64)
    assert CSPRNG().random_bytes(64) != CSPRNG().random_bytes(64)
    # one seed, separate streams: the sanitizer's noise and the sampler never repeat the masks' keystream
    streams = {CSPRNG(d, test_seed=7).random_bytes(64) for d in ("csprng", "sanitizer", "sampler")}
    assert len(streams) == 3 and CSPRNG("csprng", 7).random_bytes(64) == CSPRNG(test_seed=7).random_bytes(64)


def test_draws_never_repeat():
    rng = CSPRNG()
    a, b = rng.random_bytes(4096), rng.random_bytes(4096)
    assert a != b and rng.bytes_drawn == 8192
    for masking in (FloatMasking(CSPRNG(), scale=3.0), RingMasking(CSPRNG(), 16, 1.0)):
        m1, m2 = masking.draw((64, 64), torch.float32), masking.draw((64, 64), torch.float32)
        assert not torch.equal(m1, m2)


def test_gaussian_moments():
    z = CSPRNG().gaussian((200_000,), std=5.0, dtype=torch.float64)
    n = z.numel()
    assert abs(z.mean().item()) < 5 * 5.0 / math.sqrt(n)
    assert abs(z.std().item() / 5.0 - 1) < 0.01
    # Tails of a normal: P(|z| > 2σ) = 4.55 %.
    assert abs((z.abs() > 10.0).double().mean().item() - 0.0455) < 0.003


def test_keystream_bytes_are_uniform():
    data = torch.frombuffer(bytearray(CSPRNG().random_bytes(256 * 4000)), dtype=torch.uint8)
    counts = torch.bincount(data.long(), minlength=256).double()
    chi2 = ((counts - 4000) ** 2 / 4000).sum().item()
    assert chi2 < 330  # 255 degrees of freedom: p ≈ 0.001


def test_masks_take_the_traced_layout():
    value = torch.randn(4, 8).t()  # non-contiguous, as stage graphs may expect
    cut = Cut(0, "to_gpu", 1, "x", "ring", tuple(value.shape), torch.int64, value.stride())
    assert cut.empty().stride() == value.stride()
    expanded = torch.randn(4, 1).expand(4, 8)  # overlapping: a mask there would repeat, so it is made dense
    cut = Cut(0, "to_gpu", 1, "x", "ring", tuple(expanded.shape), torch.int64, expanded.stride())
    assert cut.empty().is_contiguous()
