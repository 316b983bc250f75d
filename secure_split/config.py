"""`SplitConfig`: the one settings object of secure_split, validated once at the edge."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from secure_split.enclave_runtime.sanitizer import MECHANISMS as SANITIZERS
from secure_split.partitioner.min_cut import Cost
from secure_split.runtime.ring_kernels import KERNELS as RING_KERNELS

MASKINGS = ("ring", "float", "remo", "none")
POOL_EMPTY = ("online", "raise")
CMIF_PUBLIC_INPUTS = ("attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class Policy:
    """What a policy means beyond its labelling pass (`compile.label_passes`): DESIGN.md, "policies"."""

    default_masking: str
    maskings: tuple[str, ...] = MASKINGS
    sanitizes_tokens: bool = False  # cmif: token ids are sanitized under ε-DP and the GPU runs the rest unmasked
    weightless_enclave: bool = False  # talaria: the enclave holds no weight, so no unmask term needing one
    public_inputs: tuple[str, ...] = ()  # the inputs that hold no private data unless the user says otherwise


POLICIES = {
    "secureinfer": Policy("ring"),
    "talaria": Policy("remo", ("remo", "none"), weightless_enclave=True),
    "cmif": Policy("none", ("none",), sanitizes_tokens=True, public_inputs=CMIF_PUBLIC_INPUTS),
    "auto": Policy("ring"),
}

# When each setting applies (as Torch-TensorRT keeps compilation settings apart from runtime ones), in the
# metadata of its field: a bundle keeps the settings the runtime needs, and a loader may choose only some.
COMPILE = {"applies": "compile", "kept": True}  # fixes the split; kept in a bundle
COMPILER = {"applies": "compile", "kept": False}  # steers the compiler only: nothing runs differently after
RUNTIME = {"applies": "runtime", "kept": True}  # how calls run: kept in a bundle, and chosen again at load
LOAD = {"applies": "runtime", "kept": False}  # how calls run here, chosen at load (default: the field's)
PROCESS = {"applies": "process", "kept": False}  # this process only (where GPU stages run, a test seed)


@dataclass(frozen=True)
class SplitConfig:
    """Every option of the compiler and its runtime.

    policy: which nodes the enclave keeps (DESIGN.md, "policies").
    masking: how values crossing to the GPU are hidden: "ring" (fixed-point values in Z_2^64 under uniform
        one-time pads: perfect hiding, exact unmasking), "float" (additive Gaussian masks: statistical hiding)
        "remo" (ReMO's factored Gaussian masks P·Q, whose unmask terms need no weight in the enclave; only
        row-wise GPU stages) or "none" (plaintext; a baseline only, and the report says so). None picks the
        policy's own: "ring"; "remo" for "talaria" (whose enclave holds no weight); "none" for "cmif" (whose GPU
        runs everything after the embedding, on ε-DP-sanitized tokens).
    mask_scale: standard deviation of the float and remo masks. Larger hides better and costs precision.
    remo_rank: m, the rank of remo masks: each row of a value crossing is hidden in an m-dimensional public
        subspace, and its projection on the other d - m dimensions crosses in the clear (the report counts
        them). None (the default) is full rank, m = d: nothing is left unmasked.
    frac_bits: ring masking's fixed-point precision: a value x travels as round(x·2^frac_bits).
    activation_bound: ring masking's declared bound on |x| for every value sent to the GPU. The compiler proves
        from it and the weights that no GPU integer overflows; a larger value at run time is an error.
    ring_kernel: how GPU stages multiply in Z_2^64: "auto" (int64 on the CPU, float64 16-bit limbs on CUDA,
        which has no int64 GEMM), "int64" or "limbs" (any device; slower on the CPU, exact everywhere).
    pool_empty: what a call does when the offline pool (`SplitProgram.precompute`) is empty: "online"
        (make its masks and unmask terms on the spot) or "raise".
    verify: check every GPU result with a Freivalds-style test (ring masking only): a wrong answer is caught
        with probability ≥ 1 - 2^-40 per call; the check vectors are made offline with the other keys.
    cost: the `auto` policy's cost model (`partitioner.min_cut.Cost`, or a dict of its fields): link bytes/s,
        latency per crossing, FLOP/s of the enclave and of the GPU.
    precompute: keys for this many calls are put in the pool when a program is built (with torch.compile the
        program is built by the first call, which then already takes its keys from the pool).
    device: where GPU stages run; None picks "cuda" when available, else "cpu".
    test_seed: TESTS ONLY. Masks, check vectors, sanitizer noise and sampling are always keyed from
        `os.urandom`; an int here derives their keys from a public label instead, so anyone who knows it
        rebuilds every mask. Every program built with it logs a warning; `export_bundle` and a remote GPU
        worker refuse it.
    private: parameter-name globs (e.g. "*lora_*") whose parameters never leave the enclave.
    public_inputs: the model arguments (keyword names, or "args[0]") that hold no private data: they may cross
        to the GPU unmasked, and a Python number among them may be baked into stage code. Every other input is
        private, and so is every int or float the caller passes: capture bakes numbers into the graph as
        constants, where a GPU stage would carry them in the clear, so `split()` refuses a private one (pass it
        as a tensor: it is then masked). None: none, except under cmif, whose GPU runs everything after the
        embedding: CMIF_PUBLIC_INPUTS (the attention mask, segment and position ids cross unmasked).
    min_gpu_flops: a GPU region with fewer FLOPs than this stays in the enclave (a round trip costs more).
    epsilon: cmif: the token sanitizer's ε per token (math.inf, the default: tokens are not sanitized, and the
        report warns).
    sanitizer: cmif: the mechanism, "rnm" (CMIF's Report-Noisy-Max), "santext+" or "custext+"
        (`enclave_runtime.sanitizer` states each one's guarantee).
    sanitizer_k: cmif: candidates per token (rnm), cluster size (custext+).
    special_token_ids: token ids the sanitizer never replaces nor produces; `split()` adds the model config's
        (pad, bos, eos, cls, sep, mask, unk).
    gpu_timeout_s: the deadline of one request to a remote GPU worker (`load_bundle(..., gpu="grpc://...")`).
    gpu_retries: how many times a call whose GPU worker was unreachable or too slow is run again, from the
        start and with fresh masks, before its `WorkerError` is raised. Only masks that a resend cannot weaken
        allow it: ring's uniform one-time pads (a fresh pad reveals nothing) and "none" (the same value again).
        Float and remo masks are Gaussian: each retry would hand the worker another noisy copy of the same
        value to average, so they never retry and a number > 0 is an error. None (the default): 2 for ring and
        none, 0 for float and remo.
    """

    policy: str = field(default="secureinfer", metadata=COMPILE)
    masking: str | None = field(default=None, metadata=COMPILE)
    mask_scale: float = field(default=100.0, metadata=COMPILE)
    remo_rank: int | None = field(default=None, metadata=COMPILE)
    frac_bits: int = field(default=20, metadata=COMPILE)
    activation_bound: float = field(default=4096.0, metadata=COMPILE)
    ring_kernel: str = field(default="auto", metadata=COMPILE)
    pool_empty: str = field(default="online", metadata=RUNTIME)
    precompute: int = field(default=0, metadata=LOAD)
    verify: bool = field(default=False, metadata=RUNTIME)
    cost: Cost = field(default_factory=Cost, metadata=COMPILER)
    device: str | None = field(default=None, metadata=PROCESS)
    test_seed: int | None = field(default=None, metadata=PROCESS)
    private: tuple[str, ...] = field(default_factory=tuple, metadata=COMPILER)
    public_inputs: tuple[str, ...] | None = field(default=None, metadata=COMPILE)
    min_gpu_flops: int = field(default=1, metadata=COMPILER)
    epsilon: float = field(default=math.inf, metadata=RUNTIME)
    sanitizer: str = field(default="rnm", metadata=COMPILE)
    sanitizer_k: int = field(default=20, metadata=COMPILE)
    special_token_ids: tuple[int, ...] = field(default_factory=tuple, metadata=COMPILE)
    gpu_timeout_s: float = field(default=30.0, metadata=LOAD)
    gpu_retries: int | None = field(default=None, metadata=LOAD)

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, tuple(POLICIES))
        policy = POLICIES[self.policy]
        if self.masking is None:
            object.__setattr__(self, "masking", policy.default_masking)
        _check_choice("masking", self.masking, MASKINGS)
        if self.masking not in policy.maskings and policy.sanitizes_tokens:
            raise ValueError("policy='cmif' runs non-linear layers on the GPU, which masks cannot pass: masking='none'")
        if self.masking not in policy.maskings:
            raise ValueError(
                f"policy='talaria' keeps no weight in the enclave, so it cannot compute the unmask terms of "
                f"masking={self.masking!r}: use masking='remo' (or 'none' for a baseline)"
            )
        if policy.weightless_enclave and self.private:
            raise ValueError("policy='talaria' keeps no weight in the enclave: private weights need 'secureinfer'")
        if self.remo_rank is not None and not (isinstance(self.remo_rank, int) and self.remo_rank >= 1):
            raise ValueError(f"SplitConfig.remo_rank must be an int >= 1 or None, got {self.remo_rank!r}")
        if self.remo_rank is not None and self.masking != "remo":
            raise ValueError(f"SplitConfig.remo_rank applies to masking='remo', not {self.masking!r}")
        if not (isinstance(self.mask_scale, int | float) and self.mask_scale > 0):
            raise ValueError(f"SplitConfig.mask_scale must be a positive number, got {self.mask_scale!r}")
        _check_choice("ring_kernel", self.ring_kernel, RING_KERNELS)
        _check_choice("pool_empty", self.pool_empty, POOL_EMPTY)
        if not (isinstance(self.frac_bits, int) and 0 <= self.frac_bits <= 30):
            raise ValueError(f"SplitConfig.frac_bits must be an int in [0, 30], got {self.frac_bits!r}")
        if not (isinstance(self.activation_bound, int | float) and 0 < self.activation_bound < 2.0**62):
            raise ValueError(f"SplitConfig.activation_bound must be a positive number, got {self.activation_bound!r}")
        if not (isinstance(self.precompute, int) and self.precompute >= 0):
            raise ValueError(f"SplitConfig.precompute must be an int >= 0, got {self.precompute!r}")
        if self.masking == "none" and (self.precompute or self.pool_empty == "raise"):
            raise ValueError("masking='none' uses no masks: precompute and pool_empty='raise' do not apply")
        if self.verify and self.masking != "ring":
            raise ValueError(f"SplitConfig.verify=True needs masking='ring' (exact results), got {self.masking!r}")
        if not (isinstance(self.epsilon, int | float) and self.epsilon > 0):
            raise ValueError(f"SplitConfig.epsilon must be a positive number (inf: no noise), got {self.epsilon!r}")
        if not policy.sanitizes_tokens and math.isfinite(self.epsilon):
            raise ValueError(f"SplitConfig.epsilon sets cmif's token sanitizer; policy {self.policy!r} has none")
        _check_choice("sanitizer", self.sanitizer, SANITIZERS)
        if not (isinstance(self.sanitizer_k, int) and self.sanitizer_k >= 1):
            raise ValueError(f"SplitConfig.sanitizer_k must be an int >= 1, got {self.sanitizer_k!r}")
        object.__setattr__(self, "special_token_ids", tuple(sorted({int(i) for i in self.special_token_ids})))
        if not (isinstance(self.gpu_timeout_s, int | float) and self.gpu_timeout_s > 0):
            raise ValueError(f"SplitConfig.gpu_timeout_s must be a positive number, got {self.gpu_timeout_s!r}")
        if self.gpu_retries is None:
            object.__setattr__(self, "gpu_retries", 2 if self.masking in ("ring", "none") else 0)
        if not (isinstance(self.gpu_retries, int) and self.gpu_retries >= 0):
            raise ValueError(f"SplitConfig.gpu_retries must be an int >= 0 or None, got {self.gpu_retries!r}")
        if self.gpu_retries and self.masking in ("float", "remo"):
            raise ValueError(
                f"SplitConfig.gpu_retries={self.gpu_retries} with masking={self.masking!r}: a retry resends the same "
                "values under fresh Gaussian masks, and the worker could average the copies to strip them; only "
                "ring (one-time pads) and none may retry: use gpu_retries=0 (or None)"
            )
        if isinstance(self.cost, dict):
            object.__setattr__(self, "cost", Cost(**self.cost))
        if not isinstance(self.cost, Cost) or min(dataclasses.astuple(self.cost)) <= 0:
            raise ValueError(f"SplitConfig.cost must be a Cost with positive fields, got {self.cost!r}")
        if self.test_seed is not None and not isinstance(self.test_seed, int):
            raise TypeError(f"SplitConfig.test_seed must be an int or None, got {type(self.test_seed).__name__}")
        if self.public_inputs is None:
            object.__setattr__(self, "public_inputs", policy.public_inputs)
        for name in ("private", "public_inputs"):  # one name alone, or any iterable of names
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("SplitConfig.device is 'cuda' but no CUDA device is available")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"SplitConfig.device must be a CPU or CUDA device, got {self.device!r}")

    @property
    def sanitizes_tokens(self) -> bool:
        """Whether the policy protects token ids by ε-DP sanitization rather than masks (cmif)."""
        return POLICIES[self.policy].sanitizes_tokens

    @property
    def plaintext(self) -> bool:
        """Whether activations cross to the GPU with no protection at all: masking "none" as a baseline."""
        return self.masking == "none" and not self.sanitizes_tokens

    @classmethod
    def kept_settings(cls) -> tuple[str, ...]:
        """The fields a bundle keeps: the split's compile settings and the runtime settings' exported values."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["kept"])

    @classmethod
    def load_settings(cls) -> tuple[str, ...]:
        """The fields a loader may choose (`load_bundle(..., **options)`): the runtime settings."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["applies"] == "runtime")

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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SplitConfig.{name} must be one of {list(choices)}, got {value!r}")
