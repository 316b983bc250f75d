"""Policies and their contracts: private weights (PEFT LoRA) under secureinfer, CMIF's ε-DP cut, who holds what."""

import peft
import pytest
import torch
from tiny_models import labelled_graph, tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig
from secure_split.partitioner.min_cut import crossing_bytes
from secure_split.partitioner.stages import build_partition
from secure_split.passes.insert_masks import InsertMasksPass
from secure_split.passes.label_cmif import PROTECTION as CMIF_PROTECTION
from secure_split.passes.leak_audit import LeakError, audit
from secure_split.passes.meta import SIDE


def lora_llama():
    model = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)  # fmt: skip  (random B: the adapter changes the output)
    return peft.get_peft_model(model, config).eval()


def test_secureinfer_keeps_a_peft_lora_adapter_in_the_enclave():
    model = lora_llama()
    args, kwargs = tiny_inputs("llama")
    program = secure_split.split(model, args, kwargs, SplitConfig(private=("*lora_*",)))
    with torch.no_grad():
        reference = model(*args, **kwargs).last_hidden_state
    with model.disable_adapter(), torch.no_grad():
        without = model(*args, **kwargs).last_hidden_state
    assert not torch.allclose(reference, without, atol=1e-3), "the adapter must matter for this test"
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, reference, atol=5e-4, rtol=1e-3)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    enclave, gpu = program.parameter_names("enclave"), program.parameter_names("gpu")
    assert len(lora) == 8 and all(any(name.endswith(e) for e in enclave) for name in lora)
    assert not [n for n in gpu if "lora_" in n], "a private adapter weight reached the GPU"
    assert "base_model.model.layers.0.self_attn.q_proj.base_layer.weight" in gpu  # the public base weight is offloaded
    assert program.report().kept_in_enclave["touches a private parameter"] == 8


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_cmif_embeds_in_the_enclave_and_runs_the_rest_on_the_gpu(name):
    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="cmif"))
    with secure_split.trace_boundary() as trace:
        out = program(*args, **kwargs).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args, **kwargs).last_hidden_state)  # identity sanitizer: exact
    report = program.report()
    assert report.masking == "none" and set(report.protection) <= {CMIF_PROTECTION, "public"}
    assert report.enclave_flop_share < 0.01
    table = model.get_input_embeddings().weight
    word_embeddings = {n for n, p in model.named_parameters() if p is table}
    assert set(program.parameter_names("enclave")) == word_embeddings  # the embedding table, nothing else
    assert not word_embeddings & set(program.parameter_names("gpu"))
    ids = args[0]
    for record in trace.to_gpu():  # raw ids never cross; the embeddings of them do
        assert not (record.tensor.shape == ids.shape and torch.equal(record.tensor, ids)), record.name


class ConstantSanitizer:
    """Replaces every token by one id: shows the hook runs before the embedding."""

    epsilon = 0.0

    def sanitize(self, token_ids):
        return torch.full_like(token_ids, 7)


def test_cmif_sanitizer_hook_runs_before_the_embedding():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="cmif"))
    program.sanitizer = ConstantSanitizer()
    with torch.no_grad():
        expected = model(torch.full_like(args[0], 7), **kwargs).last_hidden_state
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, expected)


def test_cmif_audit_refuses_raw_tokens_on_the_gpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    aten = labelled_graph(model, torch.randint(0, 50, (2, 5)), policy="cmif")
    embedding = next(n for n in aten.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert embedding.meta[SIDE] == "enclave"
    embedding.meta[SIDE] = "gpu"  # a mislabelled look-up would send the raw ids
    partition = build_partition(aten)
    InsertMasksPass("none", CMIF_PROTECTION)(partition.boundary)
    with pytest.raises(LeakError, match="raw token ids"):
        audit(partition.boundary, "none", (), "cmif", partition.labelled)


def test_cmif_refuses_masks():
    with pytest.raises(ValueError, match="cmif"):
        SplitConfig(policy="cmif", masking="ring")


def split_report(name, **config):
    torch._dynamo.reset()
    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    program = secure_split.split(model, args, kwargs, SplitConfig(**config))
    with torch.no_grad():
        reference = model(*args, **kwargs).last_hidden_state
    torch.testing.assert_close(program(*args, **kwargs).last_hidden_state, reference, atol=5e-4, rtol=1e-3)
    return program, program.report()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_auto_never_crosses_more_than_secureinfer(name):
    slow_enclave = {"enclave_flops_per_s": 1e8}  # offloading pays: auto must still not cross more
    _, secureinfer = split_report(name, cost=slow_enclave)
    _, auto = split_report(name, policy="auto", cost=slow_enclave)
    assert auto.bytes_to_gpu + auto.bytes_to_enclave <= secureinfer.bytes_to_gpu + secureinfer.bytes_to_enclave
    assert auto.enclave_flop_share < 0.25 and auto.protection == {"ring": auto.cuts}
    _, local = split_report(name, policy="auto")  # default costs: a tiny model is cheaper to keep at home
    assert local.round_trips == 0 and local.enclave_flop_share == 1.0


def test_auto_saves_bytes_on_bert_and_counts_them_as_the_runtime_does():
    slow_enclave = {"enclave_flops_per_s": 1e8}
    _, secureinfer = split_report("bert", cost=slow_enclave)
    program, auto = split_report("bert", policy="auto", cost=slow_enclave)
    assert auto.bytes_to_gpu + auto.bytes_to_enclave < secureinfer.bytes_to_gpu + secureinfer.bytes_to_enclave
    labelled = program.artifact.labelled
    assert 2 * crossing_bytes(labelled) == auto.bytes_to_gpu + auto.bytes_to_enclave  # float32 crosses as int64


def test_cost_is_validated():
    assert SplitConfig(policy="auto", cost={"latency_s": 1e-3}).cost.latency_s == 1e-3
    with pytest.raises(ValueError, match="cost"):
        SplitConfig(policy="auto", cost={"latency_s": 0})
    with pytest.raises(TypeError):
        SplitConfig(policy="auto", cost={"bandwidth": 1})
