"""ReMO's keys: masks P · Q and unmask terms P · R, where R = L(Q) is computed once, on the GPU.

For every masked value crossing, the program fixes a public basis Q (m × d). For every GPU stage call and each
of its masked inputs, the GPU runs the stage on Q's rows (zeros elsewhere) and returns R = f(Q) - f(0): the
weight owner's side computes R = Q · W, so the enclave never needs W. A call then draws a secret P per masked
value, sends x + P · Q, and removes P · R from each result: f(x + P·Q) - P·R = f(x) for a row-wise stage f.

The rank m trades one secret for the other: the d - m dimensions outside Q's span cross in the clear, and R
shows the enclave an m-dimensional projection of each weight (at full rank, m = d, the weight itself).

The enclave does not take R on trust: for every GPU stage call it draws a secret P, evaluates its own copy of
the stage's public function on P·Q and on zeros, and refuses R unless f(P·Q) - f(0) = Σ P·R (`_check`).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from secure_split.passes.insert_masks import Cut
from secure_split.passes.meta import CUT
from secure_split.runtime.stage_backend import StageBackend

from .integrity import IntegrityError
from .masking import RemoMasking

Responses = dict[int, tuple[torch.Tensor | None, ...]]  # input position -> per output, R (m × e) or None
# An honest R differs from the enclave's own evaluation by float rounding only: a relative error of about
# √n·eps(dtype) for sums of length n. The check allows 2^6 times that (measured honest: below 2^-2 times it).
_ROUNDING_ALLOWANCE = 2.0**6


class RemoKeys:
    """The public bases and GPU responses of one program, and the per-call draw of masks and terms."""

    def __init__(
        self,
        masking: RemoMasking,
        masked: list[fx.Node],
        gpu_calls: list[fx.Node],
        backend: StageBackend,
        enclave_stages: torch.nn.Module,
    ) -> None:
        """`enclave_stages`: the enclave's own copies of the GPU stages' public functions, by stage name (the
        boundary graph module: fx stages in process, CPU onnxruntime sessions from a bundle)."""
        self.masking = masking
        self.cuts: dict[str, Cut] = {n.name: n.meta[CUT] for n in masked}
        self.bases = {name: masking.basis(cut.shape[-1]) for name, cut in self.cuts.items()}  # None: identity
        self.ranks = {name: masking.rank_for(cut.shape[-1]) for name, cut in self.cuts.items()}
        self.inputs = {call.name: [a.name for a in call.args] for call in gpu_calls}
        self.outputs: dict[str, tuple[torch.Tensor, ...]] = {}  # f(0) of each call: the outputs' shapes and dtypes
        self.responses: dict[str, Responses] = {}
        for call in gpu_calls:
            self.responses[call.name] = self._responses(call, backend)
            self._check(call, enclave_stages.get_submodule(str(call.target)))

    @property
    def unmasked_share(self) -> float:
        """Of the coordinates sent masked, the share outside their basis' span: they cross in the clear."""
        total = sum(c.nbytes for c in self.cuts.values())
        clear = sum(c.nbytes * (1 - self.ranks[n] / c.shape[-1]) for n, c in self.cuts.items())
        return clear / total if total else 0.0

    def draw(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, ...]]]:
        """One call's masks (by mask node) and unmask terms (by GPU stage call)."""
        factors = self._factors(list(self.cuts))
        masks = {name: self._mask(name, factor) for name, factor in factors.items()}
        terms = {}
        for call, outputs in self.outputs.items():
            totals = self._terms(call, factors)
            terms[call] = tuple(t.reshape(o.shape).to(o.dtype) for t, o in zip(totals, outputs, strict=True))
        return masks, terms

    def _factors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """A fresh secret P for each named masked value."""
        return {name: self.masking.factor(_rows(self.cuts[name]), self.ranks[name]) for name in names}

    def _mask(self, name: str, factor: torch.Tensor) -> torch.Tensor:
        """P · Q for one masked value, in its cut's layout."""
        return _in_layout(self.cuts[name], _times(factor, self.bases[name]))

    def _terms(self, call: str, factors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Σ P·R over the masked inputs of one GPU stage call, per output (float64, rows × features)."""
        outputs = self.outputs[call]
        totals = [torch.zeros(math.prod(o.shape[:-1]), o.shape[-1], dtype=torch.float64) for o in outputs]
        for position, per_output in self.responses[call].items():
            for total, r in zip(totals, per_output, strict=True):
                if r is not None:
                    total += factors[self.inputs[call][position]] @ r
        return totals

    def _check(self, call: fx.Node, stage: torch.nn.Module) -> None:
        """Refuse the GPU's R for one stage call unless f(P·Q) - f(0) = Σ P·R for a secret Gaussian P.

        f is the enclave's copy of the stage's public function and is row-wise affine, so one evaluation on
        P·Q (every row a secret combination of Q's rows) tests all of R at once; the GPU, not knowing P,
        cannot make a wrong R pass. It costs two CPU evaluations of the stage per GPU stage call, at build
        time only. What it catches: an R inconsistent with the function the stage computes (a GPU answering
        its basis queries wrong, or computing them with other weights than its online function). What it
        cannot catch: a GPU that consistently runs other weights, online as well, since under talaria the GPU
        holds the weights; nor a wrong answer online (ReMO has no online check).

        Tolerance: the difference must stay within `_ROUNDING_ALLOWANCE`·√n·eps(dtype) of the magnitudes
        whose rounding it is made of: f(P·Q), f(0) (its rounding enters R once per basis row, so weighted by
        P's root-mean-square row norm) and P·R; n is the widest input's feature count (the length of the
        stage's sums). In float32 that lets through a wrong R only within about 1e-4 (n = 64) to 2e-3
        (n = 50257) of these magnitudes."""
        names = self.inputs[call.name]
        factors = self._factors(list(dict.fromkeys(names)))
        with torch.inference_mode():
            on_mask = stage(*[self._mask(name, factors[name]) for name in names])
            at_zero = stage(*[self.cuts[name].zeros() for name in names])
        width = max(self.cuts[name].shape[-1] for name in names)
        row_norm = math.sqrt(sum(float(f.square().sum()) / f.shape[0] for f in factors.values()))
        for k, (fp, f0, term) in enumerate(zip(on_mask, at_zero, self._terms(call.name, factors), strict=True)):
            fp, f0 = fp.double().reshape(term.shape), f0.double().reshape(term.shape)
            error = float(torch.linalg.norm(fp - f0 - term))
            scale = float(torch.linalg.norm(fp) + torch.linalg.norm(f0) * (1 + row_norm) + torch.linalg.norm(term))
            allowed = _ROUNDING_ALLOWANCE * math.sqrt(width) * torch.finfo(on_mask[k].dtype).eps * scale
            if not error <= allowed:  # also refuses NaN
                raise IntegrityError(
                    f"{call.target}: the GPU's ReMO responses R = f(Q) - f(0) disagree with the stage's function "
                    f"(output {k}: |f(P·Q) - f(0) - P·R| = {error:.3g} > {allowed:.3g} allowed for rounding); "
                    "refusing them"
                )

    def _responses(self, call: fx.Node, backend: StageBackend) -> Responses:
        """R = f(Q) - f(0) for each masked input of one GPU stage call, a block of len(rows) basis rows at a time."""
        cuts: list[Cut] = [a.meta[CUT] for a in call.args]
        zeros = [c.zeros() for c in cuts]
        stage = str(call.target)
        f0 = _run(backend, stage, cuts, zeros, "remo_zero")
        self.outputs[call.name] = f0
        responses: Responses = {}
        for position, cut in enumerate(cuts):
            name, rows = call.args[position].name, _rows(cut)
            blocks: list[list[torch.Tensor]] = [[] for _ in f0]
            for start in range(0, self.ranks[name], rows):
                block = _basis_rows(self.bases[name], cut.shape[-1], start, min(start + rows, self.ranks[name]))
                held = torch.zeros(rows, cut.shape[-1], dtype=torch.float64)
                held[: block.shape[0]] = block
                inputs = [*zeros[:position], _in_layout(cut, held), *zeros[position + 1 :]]
                outs = _run(backend, stage, cuts, inputs, "remo_basis")
                for k, (out, zero) in enumerate(zip(outs, f0, strict=True)):
                    if math.prod(out.shape[:-1]) == rows:  # outputs on other rows do not read this input
                        delta = (out.double() - zero.double()).reshape(rows, out.shape[-1])
                        blocks[k].append(delta[: block.shape[0]])
            responses[position] = tuple(torch.cat(b) if b else None for b in blocks)
        return responses


def _run(
    backend: StageBackend, stage: str, cuts: list[Cut], inputs: list[torch.Tensor], label: str
) -> tuple[torch.Tensor, ...]:
    """One public GPU run (no user data), through the backend's channel so that a trace shows it."""
    sent = [backend.send(c.stage, f"{label}:{c.name}", x) for c, x in zip(cuts, inputs, strict=True)]
    outs = backend.run(stage, sent)
    return tuple(backend.receive(cuts[0].stage, f"{label}:out{k}", out) for k, out in enumerate(outs))


def _times(factor: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return factor if basis is None else factor @ basis


def _basis_rows(basis: torch.Tensor | None, width: int, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of Q (of the identity when `basis` is None)."""
    if basis is not None:
        return basis[start:stop]
    rows = torch.zeros(stop - start, width, dtype=torch.float64)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return rows


def _rows(cut: Cut) -> int:
    return math.prod(cut.shape[:-1])


def _in_layout(cut: Cut, rows: torch.Tensor) -> torch.Tensor:
    """`rows` (leading dimensions flattened) as a tensor of the cut's shape, dtype and traced layout."""
    return cut.empty().copy_(rows.reshape(cut.shape))
