"""What the enclave does not take on trust from the GPU: talaria's basis responses are checked."""

import pytest
import torch
import transformers

import secure_split
from secure_split import IntegrityError, SplitConfig
from secure_split.program import SplitProgram
from secure_split.tiny import CONFIGS, tiny_inputs


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


def tiny_lm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(CONFIGS[name]()).eval()


def rebuilt(program: SplitProgram, config: SplitConfig, gpu: dict[str, torch.nn.Module]) -> SplitProgram:
    """The same split, with a new config and what the GPU runs for some stages replaced."""
    modules = {s.module_name: program.partition.stage_module(s) for s in program.gpu_stages}
    return SplitProgram(program.partition, config, program.input_names, gpu_modules={**modules, **gpu})


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
    assert set(program.remo.responses) == {c.name for c in program._gpu_calls}


@pytest.mark.parametrize("skew", [0.05, 1e-3])
def test_a_gpu_skewing_its_remo_responses_is_refused(talaria, skew):
    last = talaria.gpu_stages[-1].module_name
    skewed = SkewedStage(talaria.partition.stage_module(talaria.gpu_stages[-1]), skew)
    with pytest.raises(IntegrityError, match=rf"{last}: the GPU's ReMO responses R = f\(Q\) - f\(0\) disagree"):
        rebuilt(talaria, talaria.config, {last: skewed})
