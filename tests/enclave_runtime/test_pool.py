"""The offline pool: precomputed keys are used once, an empty pool follows the config, sealed files resist tampering."""

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig
from secure_split.enclave_runtime.keys import PoolEmptyError
from secure_split.enclave_runtime.pool import MaskReuseError, PoolError


@pytest.fixture
def llama_program():
    model = tiny_model("llama")
    args, kwargs = tiny_inputs("llama")
    return secure_split.split(model, args, kwargs, SplitConfig()), args, kwargs


def run_traced(program, args, kwargs):
    with secure_split.trace_boundary() as trace:
        out = program(*args, **kwargs).last_hidden_state
    return out, [r.tensor for r in trace.to_gpu()]


def test_pool_serves_calls_and_each_key_is_used_once(llama_program):
    program, args, kwargs = llama_program
    online_out, _ = run_traced(program, args, kwargs)
    assert program.precompute(3) == 3
    outs, sent = zip(*[run_traced(program, args, kwargs) for _ in range(3)], strict=True)
    for out in outs:
        assert torch.equal(out, online_out)  # ring unmasking is exact, pooled or not
    for i in range(3):
        for j in range(i + 1, 3):  # the same input under a reused mask would cross identically
            assert not any(torch.equal(a, b) for a, b in zip(sent[i], sent[j], strict=True))
    report = program.report()
    assert (report.keys_from_pool, report.keys_made_online, report.pool_size) == (3, 2, 0)
    assert report.pool_bytes_per_call == sum(c.nbytes for c in program.artifact.cuts)


def test_keys_are_refused_a_second_time(llama_program):
    program, _, _ = llama_program
    program.precompute(1)
    keys = program.keys.pool.take()
    program.keys.pool.mark_used(keys)
    with pytest.raises(MaskReuseError, match="used before"):
        program.keys.pool.mark_used(keys)


def test_empty_pool_raises_when_configured():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig(pool_empty="raise", precompute=2))
    program(*args, **kwargs)  # split() ran the first call
    assert (program.keys.pool_calls, program.keys.online_calls) == (2, 0)
    with pytest.raises(PoolEmptyError, match="precompute"):
        program(*args, **kwargs)


def test_sealed_pool_round_trip_tamper_and_replay(llama_program, tmp_path):
    program, args, kwargs = llama_program
    reference, _ = run_traced(program, args, kwargs)
    program.precompute(2)
    path = tmp_path / "pool.sealed"
    assert program.save_pool(path) == 2 and len(program.keys.pool) == 0
    blob = path.read_bytes()
    assert b"masks" not in blob  # sealed, not just serialized

    tampered = tmp_path / "tampered.sealed"
    tampered.write_bytes(blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:])
    with pytest.raises(PoolError, match="authentication failed"):
        program.load_pool(tampered)

    assert program.load_pool(path) == 2
    with pytest.raises(PoolError, match="replayed"):
        program.load_pool(path)  # still pooled
    for _ in range(2):
        assert torch.equal(run_traced(program, args, kwargs)[0], reference)
    with pytest.raises(PoolError, match="replayed"):
        program.load_pool(path)  # already used
    assert program.report().keys_from_pool == 2


def test_pool_of_another_program_is_refused(llama_program, tmp_path):
    program, _, _ = llama_program
    program.precompute(1)
    program.save_pool(tmp_path / "pool.sealed")
    torch._dynamo.reset()
    model = tiny_model("llama", seed=5)  # same shapes, other weights: other unmask terms
    args, kwargs = tiny_inputs("llama")
    other = secure_split.split(model, args, kwargs, SplitConfig())
    other.keys.pool = program.keys.pool  # even under the same enclave key
    with pytest.raises(PoolError, match="another program"):
        other.load_pool(tmp_path / "pool.sealed")
