"""Ring masking: exact Z_2^64 kernels, the fixed-point codec, bit-exact unmasking, headroom, and uniform masks."""

import pytest
import torch
from tiny_models import split_and_trace, tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig
from secure_split.passes.meta import CUT
from secure_split.passes.ring import RingOverflowError, check_bound, decode, encode, signed_limbs_needed
from secure_split.passes.ring_lower import RingLowerPass
from secure_split.runtime.ring_kernels import limb_product, ring_product

HEADROOM = "ring masking: its fixed-point values could overflow Z_2^64 on the GPU (headroom)"
CHI2_255_P001 = 330.5  # chi-square critical value, 255 degrees of freedom, p = 0.001


def uniform64(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=gen)


@pytest.mark.parametrize("public_range", [2**20, 2**40, 2**63 - 1])
def test_limb_products_equal_native_int64(public_range):
    a = uniform64(33, 300)
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-public_range, public_range, (300, 50), dtype=torch.int64, generator=gen)
    assert torch.equal(limb_product(torch.mm, a, w, public=1), a @ w)
    assert torch.equal(ring_product("mm", w.t().contiguous(), a.t().contiguous(), 0, "limbs"), w.t() @ a.t())
    x = uniform64(3, 5, 300, seed=2)
    assert torch.equal(ring_product("matmul", x, w, 1, "limbs"), torch.matmul(x, w))
    assert torch.equal(ring_product("bmm", x, uniform64(3, 300, 7, seed=3), 1, "limbs"),
                       torch.bmm(x, uniform64(3, 300, 7, seed=3)))  # fmt: skip


def test_small_public_operands_need_fewer_limbs():
    assert signed_limbs_needed(torch.tensor([-(2**15), 2**15 - 1])) == 1
    assert signed_limbs_needed(torch.tensor([2**15])) == 2
    assert signed_limbs_needed(torch.tensor([-(2**63)])) == 4


def test_codec_round_trip_and_bound():
    x = torch.tensor([0.0, 1.5, -2.25, 1000.123])
    torch.testing.assert_close(decode(encode(x, 16), 16), x, atol=2**-17, rtol=0)
    check_bound(x, 1024.0, "x")
    with pytest.raises(RingOverflowError, match="'x' reached"):
        check_bound(x, 1000.0, "x")
    with pytest.raises(RingOverflowError):
        check_bound(torch.tensor([float("nan")]), 1e9, "x")


def gpu_stage_identity_holds(program, seed=0):
    """f(x + r) - (f(r) - f(0)) == f(x) bit for bit, for every GPU stage, with x of activation size."""
    for call in program.keys.gpu_calls:
        stage = program.artifact.boundary.get_submodule(str(call.target))
        gen = torch.Generator().manual_seed(seed)
        xs, rs = [], []
        for arg in call.args:
            cut = arg.meta[CUT]
            xs.append(cut.empty().copy_(torch.randint(-(2**20), 2**20, cut.shape, generator=gen)))
            rs.append(cut.empty().copy_(uniform64(*cut.shape, seed=seed + 1)))
        terms = program.keys.unmask_terms(call, rs, cache=True)
        masked = stage(*[x + r for x, r in zip(xs, rs, strict=True)])
        for y, term, ref in zip(masked, terms, stage(*xs), strict=True):
            assert torch.equal(y - term, ref), f"{call.target}"


@pytest.mark.parametrize("kernel", ["auto", "limbs"])
def test_unmasking_is_exact_per_stage(kernel):
    program, _, _, _ = split_and_trace("llama", ring_kernel=kernel)
    gpu_stage_identity_holds(program)


def precompute_zero_masks(program):
    """Queue one call whose masks (and so unmask terms) are zero: the same integer computation, unmasked."""
    program.precompute(1)
    with torch.inference_mode():
        for secret in program.keys.pool._entries[0].tensors():
            secret.zero_()


def test_ring_output_is_bit_identical_to_the_unmasked_integer_reference():
    model = tiny_model("gpt2")
    args, kwargs = tiny_inputs("gpt2")
    program = secure_split.split(model, args, kwargs, SplitConfig())
    masked = program(*args, **kwargs).last_hidden_state
    precompute_zero_masks(program)
    with secure_split.trace_boundary() as trace:
        reference = program(*args, **kwargs).last_hidden_state
    assert torch.equal(masked, reference)
    assert max(r.tensor.abs().max().item() for r in trace.to_gpu()) < 4096 * 2**16  # really unmasked
    other_keys = secure_split.split(model, args, kwargs, SplitConfig())(*args, **kwargs).last_hidden_state
    assert torch.equal(masked, other_keys)


def test_limb_kernel_program_matches_int64_program():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    native = secure_split.split(model, args, kwargs, SplitConfig(ring_kernel="int64"))
    limbs = secure_split.split(model, args, kwargs, SplitConfig(ring_kernel="limbs"))
    assert torch.equal(native(*args, **kwargs).last_hidden_state, limbs(*args, **kwargs).last_hidden_state)


def test_what_would_overflow_stays_in_the_enclave_and_the_lowering_refuses_it():
    model = tiny_model("llama")
    args, kwargs = tiny_inputs("llama")
    program = secure_split.split(model, args, kwargs, SplitConfig())  # RoPE after q/k: 3·20 bits + weights
    kept = program.report().kept_in_enclave
    assert kept[HEADROOM] == 8  # the cos and sin products of q and k, 2 layers
    with torch.no_grad():
        torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, model(*args, **kwargs).last_hidden_state,
                                   atol=5e-4, rtol=1e-3)  # fmt: skip
    wide = secure_split.split(model, args, kwargs, SplitConfig(frac_bits=28))
    assert wide.report().kept_in_enclave[HEADROOM] > kept[HEADROOM]  # now the projections too
    # The lowering itself re-checks every bound: a float-labelled stage does not fit 28 bits.
    float_program = secure_split.split(model, args, kwargs, SplitConfig(masking="float"))
    with pytest.raises(RingOverflowError, match=r"may reach \|value\| = 2\^.*frac_bits=28"):
        RingLowerPass(28, 4096.0)(float_program.artifact.stage_module(float_program.artifact.gpu_stages[0]))


def test_an_activation_beyond_the_declared_bound_is_refused_at_run_time():
    model = tiny_model("gpt2")
    args, kwargs = tiny_inputs("gpt2")
    with pytest.raises(RingOverflowError, match=r"activation_bound = 0\.5"):
        secure_split.split(model, args, kwargs, SplitConfig(activation_bound=0.5))


def top_bytes(records) -> torch.Tensor:
    """The most significant byte of every int64 that crossed: plaintext fixed-point values are ~always 0x00/0xFF."""
    return torch.cat([(r.tensor.flatten() >> 56) & 0xFF for r in records])


def chi2_uniform(values: torch.Tensor) -> float:
    counts = torch.bincount(values, minlength=256).double()
    expected = values.numel() / 256
    return ((counts - expected) ** 2 / expected).sum().item()


def chi2_same_distribution(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square homogeneity statistic over 256 byte values."""
    table = torch.stack([torch.bincount(a, minlength=256), torch.bincount(b, minlength=256)]).double()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    keep = expected > 0
    return (((table - expected) ** 2)[keep] / expected[keep]).sum().item()


def test_ring_masked_tensors_are_uniform_and_input_independent():
    program, trace, args, kwargs = split_and_trace("gpt2")
    masked = trace.to_gpu()
    assert all(r.tensor.dtype == torch.int64 for r in masked)
    all_bytes = torch.cat([r.tensor.flatten().view(torch.uint8) for r in masked]).long()
    assert chi2_uniform(all_bytes) < CHI2_255_P001
    assert chi2_uniform(top_bytes(masked)) < CHI2_255_P001
    other = (torch.randint(2, 128, args[0].shape, generator=torch.Generator().manual_seed(9)),)
    with secure_split.trace_boundary() as trace_b:
        program(*other, **kwargs)
    assert chi2_same_distribution(top_bytes(masked), top_bytes(trace_b.to_gpu())) < CHI2_255_P001
    # The same statistics do see plaintext: the encoded activations without masks are far from uniform.
    precompute_zero_masks(program)
    with secure_split.trace_boundary() as plain:
        program(*args, **kwargs)
    assert chi2_uniform(top_bytes(plain.to_gpu())) > 100 * CHI2_255_P001


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no int64 GEMM there: limbs)")
def test_cuda_ring_products_equal_cpu_int64():
    a, w = uniform64(64, 512), uniform64(512, 96, seed=1) >> 40
    on_cuda = ring_product("mm", a.cuda(), w.cuda(), 1, "auto")
    assert torch.equal(on_cuda.cpu(), a @ w)


class NoisyMLP(torch.nn.Module):
    """A public value that cannot be folded (a random draw) feeds a GPU op: it crosses, and its stage's unmask
    terms depend on it, so they are made online even when the pool is full."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = torch.nn.Linear(16, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x) + torch.randn(4, 8) * 0.0))


@pytest.mark.parametrize("masking", ["ring", "float"])
def test_a_public_run_time_input_of_a_gpu_stage(masking):
    torch.manual_seed(0)
    model, x = NoisyMLP().eval(), torch.randn(4, 16)
    program = secure_split.split(model, (x,), config=SplitConfig(masking=masking))
    program.precompute(1)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=1e-4, rtol=1e-4)
    assert program.report().keys_from_pool == 1
    if masking == "ring":  # computed in the enclave, sent encoded (float: computed on the GPU itself)
        assert program.report().protection["public"] == 1
        with pytest.raises(NotImplementedError, match="public value"):
            secure_split.split(model, (x,), config=SplitConfig(verify=True))
