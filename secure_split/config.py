"""`SplitConfig`: the one settings object of secure_split, validated once at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

POLICIES_IMPLEMENTED = ("secureinfer",)
POLICIES_PLANNED = ("talaria", "cmif", "auto")
MASKINGS_IMPLEMENTED = ("float", "none")
MASKINGS_PLANNED = ("ring", "remo")


@dataclass(frozen=True)
class SplitConfig:
    """Every option of the compiler and its runtime.

    policy: which nodes the enclave keeps (DESIGN.md, "policies").
    masking: how values crossing to the GPU are hidden: "float" (additive Gaussian one-time masks) or "none"
        (plaintext; a baseline only, and the report says so).
    mask_scale: standard deviation of the float masks. Larger hides better and costs precision.
    device: where GPU stages run; None picks "cuda" when available, else "cpu".
    seed: None draws a fresh CSPRNG key; an int makes the mask stream reproducible (tests, benchmarks).
    private: parameter-name globs (e.g. "*lora_*") whose parameters never leave the enclave.
    min_gpu_flops: a GPU region with fewer FLOPs than this stays in the enclave (a round trip costs more).
    """

    policy: str = "secureinfer"
    masking: str = "float"
    mask_scale: float = 100.0
    device: str | None = None
    seed: int | None = None
    private: tuple[str, ...] = field(default_factory=tuple)
    min_gpu_flops: int = 1

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES_IMPLEMENTED, POLICIES_PLANNED)
        _check_choice("masking", self.masking, MASKINGS_IMPLEMENTED, MASKINGS_PLANNED)
        if not (isinstance(self.mask_scale, int | float) and self.mask_scale > 0):
            raise ValueError(f"SplitConfig.mask_scale must be a positive number, got {self.mask_scale!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"SplitConfig.seed must be an int or None, got {type(self.seed).__name__}")
        if isinstance(self.private, str):
            object.__setattr__(self, "private", (self.private,))
        object.__setattr__(self, "private", tuple(self.private))
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("SplitConfig.device is 'cuda' but no CUDA device is available")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"SplitConfig.device must be a CPU or CUDA device, got {self.device!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | SplitConfig | None) -> SplitConfig:
        """Build a config from `torch.compile(..., options={...})`; an unknown key is an error."""
        if options is None:
            return cls()
        if isinstance(options, SplitConfig):
            return options
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown secure_split option(s) {unknown}; valid options are the SplitConfig fields {sorted(known)}"
            )
        return cls(**options)


def _check_choice(name: str, value: str, implemented: tuple[str, ...], planned: tuple[str, ...]) -> None:
    if value in implemented:
        return
    if value in planned:
        raise NotImplementedError(
            f"SplitConfig.{name}={value!r} is part of the design but not implemented yet; "
            f"available: {list(implemented)}"
        )
    raise ValueError(f"SplitConfig.{name} must be one of {list(implemented)}, got {value!r}")
