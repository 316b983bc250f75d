"""all-MiniLM-L6-v2 with its real weights: sentence embeddings through secure_split match eager."""

import pytest
import torch

import secure_split
from secure_split import SplitConfig
from secure_split.demo import SENTENCES, load_minilm, mean_pool


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_minilm_torch_compile_embeddings_match(minilm):
    """The default (ring masking) through torch.compile."""
    model, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = mean_pool(model(**batch), batch["attention_mask"])
        compiled = torch.compile(model, backend="secure_split", fullgraph=True, options={})
        with secure_split.trace_boundary() as trace:
            out = mean_pool(compiled(**batch), batch["attention_mask"])
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-3)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.9999
    assert len(trace.to_gpu()) > 0


@pytest.mark.parametrize("masking", ["none", "float", "ring"])
def test_minilm_split_report(minilm, masking):
    model, tokenizer = minilm
    batch = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    program = secure_split.split(model, (), batch, SplitConfig(masking=masking))
    with torch.no_grad():
        ref = mean_pool(model(**batch), batch["attention_mask"])
    out = mean_pool(program(**batch), batch["attention_mask"])
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.9999
    report = program.report()
    assert report.round_trips >= 6 * 2, "at least attention-in and FFN per layer"
    assert report.enclave_flop_share < 0.1
