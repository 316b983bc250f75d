"""Policies and their contracts: private weights (PEFT LoRA) under secureinfer, and which side holds what."""

import peft
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig


def lora_llama():
    model = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)  # fmt: skip  (random B: the adapter changes the output)
    return peft.get_peft_model(model, config).eval()


def test_secureinfer_keeps_a_peft_lora_adapter_in_the_enclave():
    model = lora_llama()
    args, kwargs = tiny_inputs("llama")
    program = secure_split.split(model, args, kwargs, SplitConfig(private=("*lora_*",), seed=0))
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
    assert "layers.0.self_attn.q_proj.base_layer.weight" in gpu  # the public base weight is offloaded
    assert program.report().kept_in_enclave["touches a private parameter"] == 8
