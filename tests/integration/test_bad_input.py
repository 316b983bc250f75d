"""Bad options, dtypes and ops: a clear error, or the node stays in the enclave and the report says why."""

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"policy": "talaria", "masking": "ring"}, ValueError, "cannot compute the unmask terms"),
        ({"policy": "talaria", "private": ["*lora_*"]}, ValueError, "private weights need 'secureinfer'"),
        ({"policy": "magic"}, ValueError, "policy must be one of"),
        ({"masking": "remo", "remo_rank": 0}, ValueError, "remo_rank must be an int >= 1"),
        ({"remo_rank": 8}, ValueError, "applies to masking='remo'"),
            ({"frac_bits": 40}, ValueError, "frac_bits"),
            ({"pool_empty": "maybe"}, ValueError, "pool_empty must be one of"),
            ({"ring_kernel": "gpu"}, ValueError, "ring_kernel must be one of"),
        ({"masking": "xor"}, ValueError, "masking must be one of"),
        ({"mask_scale": 0}, ValueError, "positive"),
        ({"test_seed": "abc"}, TypeError, "test_seed"),
        ({"device": "tpu"}, (ValueError, RuntimeError), "device"),
        ({"nonsense": 1}, ValueError, "unknown secure_split option"),
    ],
)
def test_bad_options_are_rejected_with_the_cause(options, error, match):
    with pytest.raises(error, match=match):
        SplitConfig.from_options(options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        SplitConfig(device="cuda")


def test_half_precision_stays_in_enclave_and_report_says_why():
    model = tiny_model("bert").to(torch.float16)
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig())
    report = program.report()
    assert report.gpu_nodes == 0 and report.cuts == 0
    assert any("float16" in reason for reason in report.kept_in_enclave)
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, ref)


class OddOps(torch.nn.Module):
    """Linear layers around ops no affine rule covers (sort, cumsum, erf): those must stay in the enclave."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    def forward(self, x):
        h = self.a(x)
        h = torch.sort(h, dim=-1).values + torch.cumsum(h, dim=-1) * torch.special.erf(h)
        return self.b(h)


def test_unsupported_ops_stay_in_enclave():
    torch.manual_seed(0)
    model, x = OddOps().eval(), torch.randn(4, 32)
    program = secure_split.split(model, (x,), config=SplitConfig())
    torch.testing.assert_close(program(x), model(x), atol=1e-3, rtol=1e-3)
    kept = program.report().kept_in_enclave
    for op in ("sort", "cumsum", "erf"):
        assert any(op in reason and "not affine" in reason for reason in kept), (op, kept)
    assert program.report().round_trips == 2


def test_private_weights_never_cross():
    model = tiny_model("llama")
    args, kwargs = tiny_inputs("llama")
    config = SplitConfig(private=("layers.0.mlp.*", "norm.weight"))
    program = secure_split.split(model, args, kwargs, config)
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, ref, atol=5e-3, rtol=1e-3)
    assert program.report().kept_in_enclave.get("touches a private parameter", 0) >= 3
    private = {n.target for n in program.artifact.labelled.graph.nodes
               if n.op == "get_attr" and n.meta["secure_split.private_param"]}  # fmt: skip
    assert private
    for spec in program.artifact.gpu_stages:
        held = {n.target for n in program.artifact.stage_module(spec).graph.nodes if n.op == "get_attr"}
        assert not held & private


def test_calling_a_split_program_with_new_shapes_is_a_clear_error():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert", seq=16)
    program = secure_split.split(model, args, kwargs, SplitConfig())
    args2, kwargs2 = tiny_inputs("bert", seq=8)
    with pytest.raises(RuntimeError, match="did not run through the split program"):
        program(*args2, **kwargs2)


class ReturnsAConstant(torch.nn.Module):
    """Returns a value with no user data in it next to the real output (e.g. position ids)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x).relu(), self.proj.weight.t() * 2


def test_public_outputs_are_returned_from_the_enclave():
    torch.manual_seed(0)
    model, x = ReturnsAConstant().eval(), torch.randn(3, 8)
    program = secure_split.split(model, (x,), config=SplitConfig())
    out, const = program(x)
    ref, ref_const = model(x)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(const, ref_const)
