"""Tiny transformers models built from config with random weights (no downloads), and their inputs.

The test suite, the `inspect` CLI and the benchmarks share them.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

VOCAB = 128
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64)  # fmt: skip

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "bert": lambda: transformers.BertConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                          vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64),
    "roberta": lambda: transformers.RobertaConfig(**SMALL, pad_token_id=1),
    "distilbert": lambda: transformers.DistilBertConfig(n_layers=2, dim=64, hidden_dim=128, n_heads=4,
                                                        vocab_size=VOCAB, max_position_embeddings=64),
}  # fmt: skip
DECODERS = {"gpt2", "llama", "mistral", "qwen2", "opt"}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(CONFIGS[name]()).eval()


def tiny_inputs(name: str, batch: int = 2, seq: int = 16, seed: int = 1) -> tuple[tuple, dict]:
    """input_ids and an attention mask with left padding on the second row (decoder-style)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, :3] = 0
    kwargs = {"attention_mask": mask}
    if name in DECODERS:
        kwargs["use_cache"] = False
    return (ids,), kwargs
