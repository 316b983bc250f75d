"""CMIF's labelling: the enclave sanitizes the tokens and embeds them; everything after runs on the GPU, unmasked.

The only values that may cross are computed from the embedding's output (its tokens were sanitized with ε-DP
first) or from inputs the user declared public (`SplitConfig.public_inputs`: by default the attention mask,
segment and position ids); nothing computed from the raw token ids by any other path may leave the enclave.
`raw_token_nodes` finds those values; the leak audit recomputes it. Any other private input (a float feature,
undeclared segment ids) would cross in the clear with nothing to protect it: `undeclared_inputs` finds them and
the policy refuses them.
"""

from __future__ import annotations

import torch
from torch import fx

from .label import ENCLAVE, GPU, LabelPass, _set, packet
from .meta import SOURCE, TAINT
from .taint import PRIVATE, PUBLIC, SECRET

aten = torch.ops.aten
PROTECTION = "ε-DP, not masked"


class CmifInputError(ValueError):
    """Under cmif, a private input other than the token ids would reach the GPU with no protection."""


def token_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Private placeholders whose values reach the word embedding's look-up as its indices: the token ids."""
    word = _word_embedding(gm)
    return [] if word is None else [n for n in _private_inputs(gm) if _reaches_indices(n, word)]


def _word_embedding(gm: fx.GraphModule) -> fx.Node | None:
    """Of the look-ups indexed by private inputs, the one over the largest table: the vocabulary's (a segment
    or position table is small)."""
    private = _private_inputs(gm)
    looked_up = [e for e in _embeddings(gm) if any(_reaches_indices(n, e) for n in private)]
    return max(looked_up, key=lambda e: e.args[0].meta["val"].shape[0], default=None)


def _private_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta[TAINT] != PUBLIC]


def undeclared_inputs(gm: fx.GraphModule) -> list[str]:
    """Private graph inputs that are not token ids (their sources): nothing under cmif protects them."""
    tokens = token_inputs(gm)
    return [n.meta.get(SOURCE, n.name) for n in _private_inputs(gm) if n.users and n not in tokens]


def refuse_undeclared_inputs(gm: fx.GraphModule) -> None:
    undeclared = undeclared_inputs(gm)
    if undeclared:
        raise CmifInputError(
            f"cmif protects only the token ids (ε-DP) and runs everything after the embedding unmasked on the GPU: "
            f"input(s) {undeclared} would cross in the clear. Declare them public (SplitConfig.public_inputs) if "
            f"they hold no private data, or use policy='secureinfer', which masks every input"
        )


def token_embeddings(gm: fx.GraphModule) -> torch.Tensor:
    """The embedding table the token ids index (what cmif's sanitizer draws replacements from)."""
    word = _word_embedding(gm)
    if word is not None and word.args[0].op == "get_attr":
        return getattr(gm, str(word.args[0].target))  # capture registers constants flat
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
        refuse_undeclared_inputs(graph_module)
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
