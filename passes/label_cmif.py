"""CMIF's labelling: the enclave sanitizes the tokens and embeds them; everything after runs on the GPU, unmasked.

The only values that may cross are computed from the embedding's output (its tokens were sanitized with ε-DP
first) or from other inputs (e.g. the attention mask); nothing computed from the raw token ids by any other
path may leave the enclave. `raw_token_nodes` finds those values; the leak audit recomputes it.
"""

from __future__ import annotations

import torch
from torch import fx

from .label import ENCLAVE, GPU, LabelPass, _set, packet
from .meta import TAINT
from .taint import PRIVATE, SECRET

aten = torch.ops.aten
PROTECTION = "ε-DP, not masked"


def token_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders whose values reach an embedding look-up as its indices: the token ids."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and any(_reaches_indices(node, e) for e in _embeddings(gm)):
            found.append(node)
    return found


def token_embeddings(gm: fx.GraphModule) -> torch.Tensor:
    """The embedding table the token ids index (what cmif's sanitizer draws replacements from)."""
    tokens = token_inputs(gm)
    for embedding in _embeddings(gm):
        weight = embedding.args[0]
        if any(_reaches_indices(t, embedding) for t in tokens) and weight.op == "get_attr":
            return getattr(gm, str(weight.target))  # capture registers constants flat
    raise NotImplementedError("cmif: no embedding table read by the token ids as a plain weight: cannot sanitize")


def raw_token_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Token inputs and every value computed from them other than through an embedding's output."""
    raw: set[fx.Node] = set(token_inputs(gm))
    for node in gm.graph.nodes:
        is_embedding = node.op == "call_function" and packet(node) is aten.embedding
        if node.op == "call_function" and not is_embedding and any(p in raw for p in node.all_input_nodes):
            raw.add(node)
    return raw


class CmifLabelPass(LabelPass):
    """Embedding look-ups of token ids, and anything else reading the raw ids, stay in the enclave."""

    def call(self, graph_module: fx.GraphModule):
        self.raw = raw_token_nodes(graph_module)
        return super().call(graph_module)

    def _initial(self, node: fx.Node) -> None:
        if node.op != "call_function" or node.meta[TAINT] != PRIVATE:
            super()._initial(node)
        elif any(p.meta[TAINT] == SECRET for p in node.all_input_nodes):
            _set(node, ENCLAVE, "touches a private parameter")
        elif packet(node) is aten.embedding and node.args[1] in self.raw:
            _set(node, ENCLAVE, "cmif: the embedding look-up runs in the enclave, on sanitized tokens")
        elif node in self.raw:
            _set(node, ENCLAVE, "cmif: reads the raw token ids")
        else:
            _set(node, GPU, "cmif: after the embedding, on the GPU unmasked")


def _embeddings(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and packet(n) is aten.embedding]


def _reaches_indices(source: fx.Node, embedding: fx.Node) -> bool:
    """Whether `source` flows into the indices of `embedding` (through any ops)."""
    stack, seen = [embedding.args[1]], set()
    while stack:
        node = stack.pop()
        if node is source:
            return True
        if isinstance(node, fx.Node) and node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False
