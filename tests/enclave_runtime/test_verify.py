"""verify=True: Freivalds-style checks catch a GPU that alters one element of one result."""

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig
from secure_split.enclave_runtime.integrity import IntegrityError


@pytest.fixture
def verified():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig(verify=True))
    with torch.no_grad():
        reference = model(*args, **kwargs).last_hidden_state
    return program, args, kwargs, reference


def test_honest_gpu_passes_and_soundness_is_stated(verified):
    program, args, kwargs, reference = verified
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, reference, atol=5e-4, rtol=1e-3)
    report = program.report()
    assert report.verify_error_bits is not None and report.verify_error_bits >= 40
    assert "2^-" in str(report)
    assert all(v.plan.reps * v.plan.width == v.plan.soundness_bits for v in program.keys.verifiers.values())
    program.precompute(1)
    assert program.keys.pool.nbytes == report.pool_bytes_per_call  # masks, terms and check vectors of one call


def test_one_altered_element_is_caught(verified):
    program, args, kwargs, _ = verified
    for stage in (0, -1):
        for delta in (1, 2**40, -(2**63)):  # the last bit, a middle one, the top one
            module = program.gpu.stages[program.artifact.gpu_stages[stage].module_name]

            def malicious(mod, inputs, outputs, delta=delta):
                outputs[0][(0,) * outputs[0].dim()] += delta  # the untrusted GPU changes one integer of one result

            handle = module.register_forward_hook(malicious)
            try:
                with pytest.raises(IntegrityError, match=r"failed the Freivalds check|outside its proven range"):
                    program(*args, **kwargs)
            finally:
                handle.remove()
    program(*args, **kwargs)  # an honest GPU passes again
