"""The model's own calling convention for a program `split()` made: `(args, kwargs)` in, the model's output out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from secure_split.passes.capture_export import ExportSignature, module_attribute

if TYPE_CHECKING:
    from .program import SplitProgram


class InputSignatureError(RuntimeError):
    """A call's arguments differ from those the program was split for (shapes, dtypes, structure, Python values):
    the graph is specialized on them, so the call did not run."""


class ModelEntry:
    """Flattens a call's `(args, kwargs)` as the export did, reads the module attributes the graph takes afresh,
    checks every input against the shapes and dtypes the program was split for, runs the program on them and
    rebuilds the model's output (a transformers `ModelOutput`, a KV cache) from its flat results."""

    def __init__(self, model: torch.nn.Module, signature: ExportSignature) -> None:
        self.signature = signature
        # attributes are read on each call (they may hold a request's data): only then is the model kept
        self.model = model if any(isinstance(i.read, str) for i in signature.inputs) else None
        kwargs_spec = signature.in_spec.child(1)
        self.keywords: list[str] = list(kwargs_spec.context)

    def __call__(self, program: SplitProgram, *args: Any, **kwargs: Any) -> Any:
        leaves = self._leaves(args, kwargs)
        inputs = []
        for spec in self.signature.inputs:
            value = leaves[spec.read] if isinstance(spec.read, int) else module_attribute(self.model, spec.read)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
                got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputSignatureError(f"this call did not run through the split program: {spec.name} is {got}, "
                                          f"but the program was split for {spec.shape} {spec.dtype}; call "
                                          f"secure_split.split() again for these inputs")  # fmt: skip
            inputs.append(value)
        return tree_unflatten(list(program.run(*inputs)), self.signature.out_spec)

    def _leaves(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The call's leaves, in the export's order (keywords may come in any order)."""
        ordered = {k: kwargs[k] for k in self.keywords if k in kwargs} | kwargs
        leaves, spec = tree_flatten((args, ordered))
        if spec != self.signature.in_spec:
            raise InputSignatureError(
                f"this call did not run through the split program: it was split for arguments structured as "
                f"{self.signature.in_spec}, got {spec}; call secure_split.split() again for these arguments"
            )
        for index, value in self.signature.constants.items():
            if type(leaves[index]) is not type(value) or leaves[index] != value:  # never show the values
                raise InputSignatureError(
                    f"this call did not run through the split program: {self.signature.sources[index]} differs from "
                    f"the value it was split for (a Python value is part of the split graph); call "
                    f"secure_split.split() again for it"
                )
        return leaves
