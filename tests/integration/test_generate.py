"""Generation with split programs: token-identical to eager greedy, the KV cache never crosses, bad input."""

import pytest
import torch
import transformers

import secure_split
from secure_split import SplitConfig, SplitGenerator
from secure_split.tiny import CONFIGS


def tiny_lm(name):
    """A tiny decoder whose random weights are large enough for varied greedy output (not one repeated token)."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.initializer_range = 0.2
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generate expects for decoders
    return ids, mask


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_is_token_identical_to_eager(name):
    model = tiny_lm(name)
    ids, mask = prompt()
    generator = SplitGenerator(model, SplitConfig(), bucket=16)
    out = generator.generate(ids, 32, attention_mask=mask)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(out, expected)
    assert all(len(row.unique()) > 5 for row in out[:, 8:]), "the test needs varied output to mean anything"
    assert sorted(k for k in generator.programs if k[0] == "decode") == [("decode", (2, 1), n) for n in (16, 32, 48)]
    per_token = generator.stats.per_token()  # one decode program per cache bucket, not per token
    assert per_token["round_trips"] > 0 and per_token["enclave_flop_share"] < 0.5


def test_the_kv_cache_never_crosses_to_the_gpu():
    """With plaintext crossings (masking='none'), no tensor sent to the GPU is a cached key or value tensor
    (whole or in part along the sequence), while the new token's K/V results do come back to the enclave."""
    model = tiny_lm("gpt2")
    ids, mask = prompt()
    generator = SplitGenerator(model, SplitConfig(masking="none"), bucket=16)
    with secure_split.trace_boundary() as trace:
        out = generator.generate(ids, 6, attention_mask=mask)
    with torch.no_grad():  # the cache as eager holds it for the whole sequence
        cache = model(out, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1),
                      use_cache=True).past_key_values  # fmt: skip
    cached = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    sent = [r.tensor for r in trace.to_gpu() if r.tensor.dim() == 4]
    assert sent, "the prefill's per-head tensors cross (Q·K, A·V inputs of projections)"
    for tensor in sent:
        for kv in cached:
            if tensor.shape[:2] == kv.shape[:2] and tensor.shape[-1] == kv.shape[-1]:
                n = min(tensor.shape[2], kv.shape[2])
                assert not torch.allclose(tensor[:, :, :n], kv[:, :, :n], atol=1e-5), "a KV-cache tensor crossed"
    width = cache.layers[0].keys.shape[1] * cache.layers[0].keys.shape[-1]
    assert any(r.tensor.shape[-1] >= width for r in trace.to_enclave())  # projections come back to the enclave


def test_sampling_uses_the_enclave_csprng_reproducibly():
    model = tiny_lm("llama")
    ids, mask = prompt()
    runs = [secure_split.generate(model, ids, 8, SplitConfig(test_seed=7), mask, bucket=16, do_sample=True,
                                  temperature=0.8, top_k=20, top_p=0.9) for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])
    other = secure_split.generate(model, ids, 8, SplitConfig(test_seed=8), mask, bucket=16, do_sample=True)
    assert not torch.equal(runs[0], other)
    greedy = secure_split.generate(model, ids, 8, SplitConfig(test_seed=7), mask, bucket=16)
    top1 = secure_split.generate(model, ids, 8, SplitConfig(test_seed=9), mask, bucket=16, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)


@pytest.mark.parametrize(
    ("ids", "new", "match"),
    [(torch.zeros(1, 0, dtype=torch.long), 4, "non-empty prompt"), (torch.ones(1, 8, dtype=torch.long), 0,
     "max_new_tokens must be >= 1"), (torch.ones(1, 60, dtype=torch.long), 8, "exceed the model's 64 positions")],
)  # fmt: skip
def test_bad_generation_input_is_refused(ids, new, match):
    with pytest.raises(ValueError, match=match):
        secure_split.generate(tiny_lm("gpt2"), ids, new)
    with pytest.raises(ValueError, match="temperature"):
        secure_split.generate(tiny_lm("gpt2"), torch.ones(1, 4, dtype=torch.long), 2, do_sample=True, temperature=0)


def test_a_compiled_model_works_inside_transformers_generate():
    """fullgraph=True: no graph break can move work elsewhere; each new cache length gets its own program."""
    model, reference = tiny_lm("gpt2"), tiny_lm("gpt2")
    # generate() passes logits_to_keep=1, a Python int Dynamo bakes into the graph: public, and declared so
    options = {"public_inputs": ("logits_to_keep",)}
    model.forward = torch.compile(model.forward, backend="secure_split", fullgraph=True, options=options)
    ids, mask = prompt()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)
    assert secure_split.last_program().report().round_trips > 0


def test_the_pool_is_filled_for_a_whole_generation_ahead():
    model = tiny_lm("llama")
    ids, mask = prompt()
    generator = SplitGenerator(model, SplitConfig(), bucket=16)
    pools = generator.precompute(ids, 12, attention_mask=mask)
    # 11 decode steps on caches of 8..18 positions: 9 in the bucket of 16, 2 in the bucket of 32
    assert pools == {("prefill", (2, 8)): 1, ("decode", (2, 1), 16): 9, ("decode", (2, 1), 32): 2}
    online = {k: p.keys.online_calls for k, p in generator.programs.items()}
    out = generator.generate(ids, 12, attention_mask=mask)
    assert {k: p.keys.online_calls for k, p in generator.programs.items()} == online  # every key came from a pool
    assert all(len(p.keys.pool) == 0 and p.keys.pool_calls > 0 for p in generator.programs.values())
    with torch.no_grad():
        assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
