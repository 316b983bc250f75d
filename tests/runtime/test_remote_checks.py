"""What the enclave does not take on trust from the GPU, and how it calls it: talaria's basis responses are
checked, Gaussian masks are never resent on a retry, calls are thread-safe, and fixed-point precision loss
is reported."""

import dataclasses
import logging
import threading

import pytest
import torch
import transformers

import secure_split
from secure_split import IntegrityError, SplitConfig
from secure_split.enclave_runtime.masking import MIN_SIGNIFICANT_BITS
from secure_split.program import SplitProgram
from secure_split.runtime.stage_backend import WorkerError
from secure_split.tiny import CONFIGS, tiny_inputs


class Mlp(torch.nn.Module):
    """Its input crosses to the GPU first (the first linear), then its hidden activation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class SkewedStage(torch.nn.Module):
    """An untrusted GPU stage that scales its answer by 1 + skew whenever an input is nonzero: at build time,
    its ReMO basis queries (its answer on zeros, f(0), stays right)."""

    def __init__(self, stage: torch.nn.Module, skew: float) -> None:
        super().__init__()
        self.stage = stage
        self.skew = skew

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = tuple(self.stage(*inputs))
        if all(bool((x == 0).all()) for x in inputs):
            return outputs
        return tuple(out * (1 + self.skew) for out in outputs)


class FailingStage(torch.nn.Module):
    """A GPU stage whose worker becomes unreachable once `failing` is set: every call is a retryable error."""

    def __init__(self, stage: torch.nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.failing = False
        self.calls = 0

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.failing:
            return tuple(self.stage(*inputs))
        self.calls += 1
        raise WorkerError("GPU worker grpc://gpu:8001: ModelInfer failed: UNAVAILABLE", retryable=True)


def tiny_lm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(CONFIGS[name]()).eval()


def rebuilt(program: SplitProgram, config: SplitConfig, gpu: dict[str, torch.nn.Module]) -> SplitProgram:
    """The same split, with a new config and what the GPU runs for some stages replaced."""
    modules = {s.module_name: program.artifact.stage_module(s) for s in program.artifact.gpu_stages}
    return SplitProgram(dataclasses.replace(program.artifact, config=config), gpu_modules={**modules, **gpu})


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def talaria(request):
    model = tiny_lm(request.param)
    args, kwargs = tiny_inputs(request.param)
    return secure_split.split(model, args, kwargs, SplitConfig(policy="talaria", test_seed=0))


@pytest.mark.parametrize("rank", [1, 8, 16, 63, 64, 100, None])
def test_honest_remo_responses_pass_the_enclave_check_at_every_rank(talaria, rank):
    """Widths are 64 (hidden) and 128 (one-hot over the vocabulary), so the ranks cover m < d, m = d and m > d."""
    config = SplitConfig(policy="talaria", remo_rank=rank, test_seed=0)
    program = rebuilt(talaria, config, {})  # builds its bases, asks the GPU for R and checks it
    assert set(program.keys.remo.responses) == {c.name for c in program.keys.gpu_calls}


@pytest.mark.parametrize("skew", [0.05, 1e-3])
def test_a_gpu_skewing_its_remo_responses_is_refused(talaria, skew):
    last = talaria.artifact.gpu_stages[-1].module_name
    skewed = SkewedStage(talaria.artifact.stage_module(talaria.artifact.gpu_stages[-1]), skew)
    with pytest.raises(IntegrityError, match=rf"{last}: the GPU's ReMO responses R = f\(Q\) - f\(0\) disagree"):
        rebuilt(talaria, talaria.config, {last: skewed})


def test_gaussian_masks_never_retry():
    assert SplitConfig().gpu_retries == 2 and SplitConfig(masking="none").gpu_retries == 2
    assert SplitConfig(masking="float").gpu_retries == 0 and SplitConfig(policy="talaria").gpu_retries == 0
    for masking in ("float", "remo"):
        with pytest.raises(ValueError, match="average the copies"):
            SplitConfig(masking=masking, gpu_retries=1)
    assert SplitConfig(masking="ring", gpu_retries=5).gpu_retries == 5


@pytest.mark.parametrize(("policy", "attempts"), [("talaria", 1), ("secureinfer", 3)])
def test_a_failing_worker_is_retried_under_ring_masks_only(policy, attempts):
    x = torch.randn(4, 16)
    split = secure_split.split(Mlp().eval(), (x,), config=SplitConfig(policy=policy, test_seed=0))
    first = split.artifact.gpu_stages[0].module_name
    failing = FailingStage(split.artifact.stage_module(split.artifact.gpu_stages[0]))
    program = rebuilt(split, split.config, {first: failing})  # remo asks the GPU for R here: it still answers
    failing.failing = True
    with pytest.raises(WorkerError, match="UNAVAILABLE"):
        program.run(x)
    assert failing.calls == attempts and program.executor.retried == attempts - 1 and program.calls == 0


def test_one_program_serves_many_threads():
    """Without its lock, 6 threads × 10 calls of this program failed ~20 of 60 calls ("Already borrowed": the
    mask CSPRNG's cipher was entered by two threads at once)."""
    model = tiny_lm("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig(test_seed=0))
    inputs = [tiny_inputs("bert", seed=t) for t in range(6)]
    with torch.no_grad():
        expected = [model(*a, **k).last_hidden_state for a, k in inputs]
    results: list[list[torch.Tensor]] = [[] for _ in inputs]
    errors: list[BaseException] = []

    def serve(t: int) -> None:
        try:
            for _ in range(10):
                results[t].append(program(*inputs[t][0], **inputs[t][1]).last_hidden_state)
        except BaseException as error:  # the main thread asserts there was none
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for got, want in zip(results, expected, strict=True):
        assert len(got) == 10
        for out in got:
            torch.testing.assert_close(out, want, atol=5e-4, rtol=1e-3)
    assert program.calls == 61 and program.report().keys_made_online == 61  # with the capture call


def test_values_below_fixed_point_resolution_are_reported(caplog):
    model = Mlp().eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    program = secure_split.split(model, (x,), config=SplitConfig(test_seed=0))
    assert program.report().precision_lost == {}
    with caplog.at_level(logging.WARNING, logger="secure_split"):
        program(x * 1e-6)
        program(x * 1e-6)
    lost = program.report().precision_lost
    first = program.artifact.cuts[0].name
    assert first in lost and lost[first] < MIN_SIGNIFICANT_BITS
    warnings = [r.getMessage() for r in caplog.records if "significant bits" in r.getMessage()]
    assert len(warnings) == len(lost)  # once per cut, though it was called twice
    assert f"cut {first!r}" in warnings[0] and "raise SplitConfig.frac_bits" in warnings[0]
    assert "significant bits in fixed point (raise frac_bits)" in str(program.report())
