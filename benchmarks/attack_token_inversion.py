"""Token inversion: how much of the input an adversary on the GPU side recovers from what crosses to it.

    python benchmarks/attack_token_inversion.py [--scales 1 10 100 1000] [--models gpt2 minilm]

Threat model (issue #3): the adversary holds every tensor `trace_boundary()` records as to_gpu, and the model's
public weights. Both attacks are scored as top-1 token recovery on held-out inputs, per cut and masking:

1. Nearest neighbour on the first cut, the layer-0 normed embedding: at each position, the vocabulary id whose
   embedding, normed as the enclave computes it from the public weights, is nearest (L2) to the received row.
2. A linear probe per cut: ridge regression from centred features onto one-hot token ids, fitted on unmasked
   (masking="none") activations of training inputs, then applied to held-out inputs under each masking.

A crossing is mapped to tokens when it is [B, T, ...], [B, H, T, ...] (per head; per query for attention) or
[B·T, ...]; other cuts are skipped and listed. A ring crossing (int64) is read as int / 2^frac_bits.

Models: tiny GPT-2 (secure_split.tiny: random weights, vocabulary 128) on uniform random token ids, chance
1/128; and all-MiniLM-L6-v2 (real weights) on English sentences taken from the docstrings of Python
standard-library modules (DOC_MODULES, as installed with the Python running this script; nothing is
downloaded). For MiniLM only content tokens count (not [CLS], [SEP] or padding), the probe's classes are the ids
seen in training, and chance is the majority rate: the test share of the most frequent training token, the
best that a guess ignoring the input does on average (the uniform rates are in the JSON). Each row also shows
"blind": the expected top-1 of its own guesses shuffled across tokens, sum_c P(truth = c)·P(guess = c), i.e. what
those guesses score without any information about the input; leakage is top-1 above blind. (Nearest neighbour
is the maximum-likelihood guess under Gaussian masks but ignores token frequencies, so under heavy masking it
lands on rare tokens and scores below the majority rate.) Every masking draws its masks from its own OS-keyed stream.

ReMO (policy="talaria", masking="remo", on tiny GPT-2): a mask P·Q hides each row only inside the span of the
public basis Q (rank m). For every cut and rank the script measures, on the run itself, the rank of what was
added to the plaintext (sent minus the masking="none" run on the same inputs), the share of the plaintext's
energy outside span(Q), and two attacks: the plaintext-fitted probe on the raw rows, and the adversary who
knows Q: a probe fitted on plaintext projected onto the complement of span(Q), applied to the sent rows
projected the same way. Talaria's first cut is the one-hot rows of the token ids.

Writes benchmarks/results/attack_token_inversion.json and .png (and attack_remo.png).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import secure_split
from secure_split import SplitConfig
from secure_split.demo import load_minilm
from secure_split.runtime.channel import Crossing
from secure_split.tiny import VOCAB, tiny_model

RESULTS = Path(__file__).parent / "results"
DOC_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
               "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client",
               "http.server", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
               "multiprocessing", "os", "pathlib", "pickle", "pydoc", "queue", "random", "shutil", "smtplib",
               "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
               "typing", "unittest", "urllib.request", "uuid", "warnings", "xml.dom.minidom", "zipfile")  # fmt: skip
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
PROSE = re.compile(r"[A-Z][A-Za-z ,;:'\-]+\.")
RIDGE = 1e-3
Key = tuple[int, str]  # a crossing: (stage, name)


@dataclass
class Batch:
    """One fixed-shape model call, its token ids [B, T] and which positions are scored."""

    kwargs: dict[str, Any]
    ids: torch.Tensor
    keep: torch.Tensor


@dataclass
class Workload:
    """A model, its train and test batches, the enclave's first-cut candidates per position, and chance."""

    name: str
    model: torch.nn.Module
    train: list[Batch]
    test: list[Batch]
    candidates: Callable[[int], torch.Tensor]
    chance: float
    setup: dict[str, Any]


@dataclass
class Observed:
    """One cut over a list of batches: its shape per call and its scored tokens' rows (None: not per-token)."""

    shape: tuple[int, ...]
    tokens: torch.Tensor | None


@dataclass
class Probe:
    """Ridge regression from centred features onto one-hot token ids; predicts the arg-max class."""

    mean: torch.Tensor
    scale: float
    weight: torch.Tensor
    classes: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted token id of each row of `x`."""
        z = (x - self.mean) / self.scale
        return self.classes[(z @ self.weight[:-1] + self.weight[-1]).argmax(1)]


def fit_probe(x: torch.Tensor, y: torch.Tensor) -> Probe:
    """Closed-form ridge fit on the classes present in `y`; the penalty is RIDGE times the mean Gram diagonal."""
    classes = y.unique()
    mean = x.mean(0)
    centred = x - mean
    scale = centred.std().item() or 1.0
    z = torch.cat([centred / scale, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = z.T @ z
    gram.diagonal().add_(RIDGE * gram.diagonal().mean())
    target = torch.zeros(z.shape[1], len(classes), dtype=z.dtype).index_add_(1, torch.searchsorted(classes, y), z.T)
    return Probe(mean, scale, torch.linalg.solve(gram, target), classes)


def labels(batches: list[Batch]) -> torch.Tensor:
    """The scored token ids of `batches`, in order."""
    return torch.cat([b.ids[b.keep] for b in batches])


def positions(batches: list[Batch]) -> torch.Tensor:
    """The position of each scored token of `batches`, in order."""
    return torch.cat([torch.arange(b.ids.shape[1]).expand_as(b.ids)[b.keep] for b in batches])


def decode(tensor: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """What the adversary reads: floats as sent, ring integers as fixed point int / 2^frac_bits."""
    if tensor.is_floating_point():
        return tensor.float()
    return (tensor.to(torch.float64) / 2.0**frac_bits).float()


def per_token(tensor: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    """[B·T, F] rows of a crossing, one per token, or None when no axis is the token axis."""
    shape = tuple(tensor.shape)
    if shape[:2] == (batch, seq):
        return tensor.reshape(batch * seq, -1)
    if len(shape) == 4 and shape[0] == batch and shape[2] == seq:
        return tensor.transpose(1, 2).reshape(batch * seq, -1)
    if shape[:1] == (batch * seq,):
        return tensor.reshape(batch * seq, -1)
    return None


def crossings(program: secure_split.SplitProgram, batches: list[Batch]) -> Iterator[tuple[Batch, list[Crossing]]]:
    """Run `program` on each batch; yield the batch and its to_gpu crossings."""
    for batch in batches:
        with secure_split.trace_boundary() as trace:
            program(**batch.kwargs)
        yield batch, trace.to_gpu()


def observe(program: secure_split.SplitProgram, batches: list[Batch]) -> dict[Key, Observed]:
    """Every to_gpu cut over `batches`, in crossing order, decoded and reduced to the scored tokens."""
    frac_bits = program.config.frac_bits
    shapes: dict[Key, tuple[int, ...]] = {}
    parts: dict[Key, list[torch.Tensor | None]] = {}
    for batch, sent in crossings(program, batches):
        for crossing in sent:
            key = (crossing.stage, crossing.name)
            shapes[key] = tuple(crossing.tensor.shape)
            rows = per_token(decode(crossing.tensor, frac_bits), *batch.ids.shape)
            parts.setdefault(key, []).append(None if rows is None else rows[batch.keep.reshape(-1)])
    return {
        key: Observed(shapes[key], None if any(p is None for p in rows) else torch.cat(rows))
        for key, rows in parts.items()
    }


@torch.no_grad()
def nearest_neighbour(workload: Workload, first: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
    """Per scored token, the id whose first-cut candidate at its position is nearest (L2) to `first`'s row."""
    where = positions(batches)
    guess = torch.empty(len(where), dtype=torch.long)
    for p in where.unique().tolist():
        at = where == p
        guess[at] = torch.cdist(first[at], workload.candidates(p)).argmin(1)
    return guess


@torch.no_grad()
def is_normed_embedding(workload: Workload, first: torch.Tensor, batches: list[Batch]) -> bool:
    """Whether the unmasked first cut equals the enclave's candidate of each true token (so attack 1 applies)."""
    where, truth = positions(batches), labels(batches)
    expected = torch.empty_like(first)
    for p in where.unique().tolist():
        at = where == p
        expected[at] = workload.candidates(p)[truth[at]]
    return torch.allclose(first, expected, atol=1e-4, rtol=1e-4)


def build(workload: Workload, options: dict[str, Any]) -> secure_split.SplitProgram:
    """Split the workload's model for its batch shape."""
    torch._dynamo.reset()  # one live program at a time: Dynamo's cache of the model's forward stays small
    return secure_split.split(workload.model, (), workload.test[0].kwargs, SplitConfig(**options))


def settings(scales: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """The masked settings to attack, as (label, SplitConfig options)."""
    floats = [(f"float {s:g}", {"masking": "float", "mask_scale": s}) for s in scales]
    return [*floats, ("ring", {"masking": "ring"})]


def blind_rate(guess: torch.Tensor, truth: torch.Tensor) -> float:
    """Expected top-1 rate of the same guesses shuffled across tokens: their score without input information."""
    _, codes = torch.cat([guess, truth]).unique(return_inverse=True)
    counts = [torch.bincount(c, minlength=int(codes.max()) + 1).double() for c in codes.split(len(guess))]
    return (counts[0] @ counts[1]).item() / len(guess) ** 2


def row(workload: Workload, attack: str, index: int, key: Key, shape: tuple, masking: str, guess: torch.Tensor,
        truth: torch.Tensor) -> dict:  # fmt: skip
    """One result: top-1 recovery (with its binomial standard error), its guesses' blind rate, chance; in %."""
    top1 = (guess == truth).double().mean().item()
    stderr = (top1 * (1 - top1) / len(truth)) ** 0.5
    return {"model": workload.name, "attack": attack, "cut": index, "crossing": f"stage {key[0]} {key[1]}",
            "shape": list(shape), "masking": masking, "top1_pct": 100 * top1, "stderr_pct": 100 * stderr,
            "blind_pct": 100 * blind_rate(guess, truth), "chance_pct": 100 * workload.chance,
            "tokens": len(truth)}  # fmt: skip


def score(workload: Workload, masking: str, observed: dict[Key, Observed], probes: dict[Key, Probe],
          first: Key | None) -> list[dict]:  # fmt: skip
    """Both attacks on one masking's held-out observations (attack 1 on cut `first`, unless None)."""
    truth = labels(workload.test)
    rows = []
    if first is not None and (received := tokens_of(workload, masking, observed, first)) is not None:
        guess = nearest_neighbour(workload, received, workload.test)
        rows.append(row(workload, "nearest neighbour", 0, first, observed[first].shape, masking, guess, truth))
    for index, key in enumerate(probes):
        if (received := tokens_of(workload, masking, observed, key)) is not None:
            guess = probes[key].predict(received)
            rows.append(row(workload, "linear probe", index, key, observed[key].shape, masking, guess, truth))
    return rows


def tokens_of(workload: Workload, masking: str, observed: dict[Key, Observed], key: Key) -> torch.Tensor | None:
    """The per-token rows of plaintext cut `key` in this run; None, with a note, when it was not sent so."""
    cut = observed.get(key)
    if cut is None or cut.tokens is None:
        print(f"[{workload.name}] masking {masking}: cut {key} not sent per-token as in plaintext; not scored")
        return None
    return cut.tokens


def train_probes(workload: Workload, train: dict[Key, Observed]) -> dict[Key, Probe]:
    """One probe per per-token cut of the plaintext training run, in crossing order; prints the cuts it skips."""
    y = labels(workload.train)
    for key, cut in train.items():
        if cut.tokens is None:
            print(f"[{workload.name}] cut {key} {list(cut.shape)} has no token axis; skipped")
    return {key: fit_probe(cut.tokens, y) for key, cut in train.items() if cut.tokens is not None}


def first_cut(workload: Workload, plain: dict[Key, Observed]) -> Key | None:
    """The first crossing if it is the layer-0 normed embedding (checked on plaintext), else None with a note."""
    key = next(iter(plain))
    applies = plain[key].tokens is not None and is_normed_embedding(workload, plain[key].tokens, workload.test)
    workload.setup["first_cut_is_normed_embedding"] = applies
    if not applies:
        print(f"[{workload.name}] the first cut {key} is not the layer-0 normed embedding; attack 1 skipped")
    return key if applies else None


def attack(workload: Workload, scales: list[float]) -> list[dict]:
    """Fit the probes on plaintext training runs, then score both attacks in plaintext and under each masking."""
    plain = build(workload, {"masking": "none"})
    probes = train_probes(workload, observe(plain, workload.train))
    observed = observe(plain, workload.test)
    first = first_cut(workload, observed)
    rows = score(workload, "none", observed, probes, first)
    for masking, options in settings(scales):
        rows += score(workload, masking, observe(build(workload, options), workload.test), probes, first)
    return rows


def remo_bases(program: secure_split.SplitProgram) -> dict[Key, torch.Tensor | None]:
    """The public basis Q of every remo cut, by crossing (the GPU knows them); None: full rank (identity)."""
    return {(cut.stage, cut.name): program.keys.remo.bases[name] for name, cut in program.keys.remo.cuts.items()}


def complement(basis: torch.Tensor | None, width: int) -> torch.Tensor:
    """The projection onto the complement of span(Q): what crosses in the clear."""
    if basis is None:
        return torch.zeros(width, width)
    return (torch.eye(width, dtype=torch.float64) - basis.T @ basis).float()


def attack_remo(workload: Workload, ranks: list[int | None]) -> list[dict]:
    """Talaria with remo masks at each rank: measured mask rank, clear energy, and both probes per cut."""
    plain = build(workload, {"policy": "talaria", "masking": "none"})
    train, test = observe(plain, workload.train), observe(plain, workload.test)
    y, truth = labels(workload.train), labels(workload.test)
    rows = []
    for rank in ranks:
        program = build(workload, {"policy": "talaria", "remo_rank": rank})
        label = f"remo m={rank or 'd'}"
        sent, bases = observe(program, workload.test), remo_bases(program)
        for index, (key, cut) in enumerate(test.items()):
            if cut.tokens is None or key not in sent or sent[key].tokens is None or key not in bases:
                continue
            width = cut.tokens.shape[1]
            project = complement(bases[key], width)
            added = (sent[key].tokens - cut.tokens).double()
            clear = ((cut.tokens @ project).norm() / cut.tokens.norm()).item() ** 2
            facts = {"rank": rank or width, "width": width, "clear_energy_pct": 100 * clear,
                     "mask_rank": int(torch.linalg.matrix_rank(added, rtol=1e-3))}  # fmt: skip
            probes = {"linear probe": (fit_probe(train[key].tokens, y), sent[key].tokens),
                      "probe on complement": (fit_probe(train[key].tokens @ project, y),
                                              sent[key].tokens @ project)}  # fmt: skip
            for attack_name, (probe, received) in probes.items():
                rows.append(row(workload, attack_name, index, key, cut.shape, label, probe.predict(received), truth))
                rows[-1].update(facts)
    return rows


def gpt2_workload(batch: int, seq: int, train_batches: int, test_batches: int) -> Workload:
    """Tiny GPT-2 (random weights) on uniform random token ids; every position is scored."""
    model = tiny_model("gpt2")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(train_batches + test_batches):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        batches.append(Batch({"input_ids": ids, "use_cache": False}, ids, torch.ones_like(ids, dtype=torch.bool)))

    def candidates(position: int) -> torch.Tensor:
        """ln_1 of layer 0 applied to wte[v] + wpe[position], for every id v."""
        return model.h[0].ln_1(model.wte.weight + model.wpe.weight[position])

    setup = {"vocab": VOCAB, "chance": "1/vocab", "inputs": "uniform random token ids"}
    return Workload("tiny GPT-2", model, batches[:train_batches], batches[train_batches:], candidates, 1 / VOCAB,
                    setup)  # fmt: skip


def docstrings(module: Any) -> Iterator[str]:
    """The docstrings of a module, its public functions and classes, and their public methods."""
    yield inspect.getdoc(module) or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            yield from (inspect.getdoc(m) or "" for n, m in sorted(vars(obj).items())
                        if not n.startswith("_") and inspect.isfunction(m))  # fmt: skip


def stdlib_sentences() -> list[str]:
    """Distinct prose sentences of 8-24 words from the docstrings of DOC_MODULES, in a fixed order."""
    found: dict[str, None] = {}
    for name in DOC_MODULES:
        for doc in docstrings(importlib.import_module(name)):
            for paragraph in doc.split("\n\n"):
                for sentence in SENTENCE_BREAK.split(" ".join(paragraph.split())):
                    if PROSE.fullmatch(sentence) and 8 <= len(sentence.split()) <= 24:
                        found[sentence] = None
    return list(found)


def text_batch(tokenizer: Any, sentences: list[str], seq: int) -> Batch:
    """Sentences padded (or truncated) to `seq` tokens; their content tokens are scored."""
    kwargs = dict(tokenizer(sentences, padding="max_length", max_length=seq, truncation=True, return_tensors="pt"))
    ids = kwargs["input_ids"]
    special = torch.tensor(tokenizer.all_special_ids)
    return Batch(kwargs, ids, kwargs["attention_mask"].bool() & ~torch.isin(ids, special))


def minilm_workload(batch: int, seq: int, test_sentences: int) -> Workload:
    """all-MiniLM-L6-v2 on standard-library docstring sentences, shuffled with a fixed seed."""
    model, tokenizer = load_minilm()
    sentences = stdlib_sentences()
    random.Random(0).shuffle(sentences)
    starts = range(0, len(sentences) - batch + 1, batch)
    batches = [text_batch(tokenizer, sentences[i : i + batch], seq) for i in starts]
    test, train = batches[: test_sentences // batch], batches[test_sentences // batch :]
    emb = model.embeddings

    def candidates(position: int) -> torch.Tensor:
        """The embeddings' LayerNorm of word[v] + position[position] + token_type[0], for every id v."""
        return emb.LayerNorm(emb.word_embeddings.weight + emb.position_embeddings.weight[position]
                             + emb.token_type_embeddings.weight[0])  # fmt: skip

    y_train, y_test = labels(train), labels(test)
    classes = y_train.unique()
    majority = (y_test == y_train.mode().values).double().mean().item()
    setup = {"vocab": model.config.vocab_size, "sentences": len(sentences), "classes_seen_in_training": len(classes),
             "test_tokens_of_seen_classes_pct": 100 * torch.isin(y_test, classes).double().mean().item(),
             "chance": "majority: test share of the most frequent training token",
             "uniform_over_seen_classes_pct": 100 / len(classes),
             "uniform_over_vocab_pct": 100 / model.config.vocab_size,
             "inputs": f"docstring sentences of the Python {sys.version.split()[0]} standard library"}  # fmt: skip
    return Workload("all-MiniLM-L6-v2", model, train, test, candidates, majority, setup)


def print_table(rows: list[dict]) -> None:
    """Rows: model, attack, cut, masking; columns: top-1 recovery, its blind rate and chance, in percent."""
    header = f"{'model':<18}{'attack':<19}{'cut':>4}  {'crossing':<20}{'shape':<18}{'masking':<12}{'top-1 %':>9}" \
             f"{'blind %':>9}{'chance %':>10}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18}{r['attack']:<19}{r['cut']:>4}  {r['crossing']:<20}{r['shape']!s:<18}"
              f"{r['masking']:<12}{r['top1_pct']:>9.2f}{r['blind_pct']:>9.2f}{r['chance_pct']:>10.2f}")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """Probe recovery vs cut per masking (lines), nearest neighbour at cut 0 (stars), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for i, masking in enumerate(dict.fromkeys(r["masking"] for r in mine)):
            probe = [r for r in mine if r["masking"] == masking and r["attack"] == "linear probe"]
            nn = [r for r in mine if r["masking"] == masking and r["attack"] == "nearest neighbour"]
            color = f"C{i}"
            ax.plot([r["cut"] for r in probe], [r["top1_pct"] for r in probe], "o-", ms=3, color=color, label=masking)
            ax.plot([r["cut"] for r in nn], [r["top1_pct"] for r in nn], "*", ms=12, color=color)
        ax.axhline(mine[0]["chance_pct"], ls="--", color="k", lw=1, label="chance")
        ax.set(title=f"{model} (stars: nearest neighbour on cut 0)", xlabel="cut (to_gpu crossing, in order)",
               ylabel="top-1 token recovery %", ylim=(-2, 102))  # fmt: skip
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_remo_table(rows: list[dict]) -> None:
    """Per rank and cut: width, the rank measured on what was added, clear energy, and both attacks' top-1."""
    header = f"{'masking':<12}{'cut':>4}  {'crossing':<24}{'width':>6}{'mask rank':>10}{'clear energy %':>15}" \
             f"{'probe %':>9}{'complement probe %':>20}{'chance %':>10}"  # fmt: skip
    print(header)
    print("-" * len(header))
    plain = {(r["masking"], r["cut"]): r for r in rows if r["attack"] == "linear probe"}
    for r in (r for r in rows if r["attack"] == "probe on complement"):
        raw = plain[(r["masking"], r["cut"])]
        print(f"{r['masking']:<12}{r['cut']:>4}  {r['crossing']:<24}{r['width']:>6}{r['mask_rank']:>10}"
              f"{r['clear_energy_pct']:>15.2f}{raw['top1_pct']:>9.2f}{r['top1_pct']:>20.2f}"
              f"{r['chance_pct']:>10.2f}")  # fmt: skip


def plot_remo(rows: list[dict], path: Path) -> None:
    """Complement-probe recovery vs cut, one line per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    mine = [r for r in rows if r["attack"] == "probe on complement"]
    for i, masking in enumerate(dict.fromkeys(r["masking"] for r in mine)):
        line = [r for r in mine if r["masking"] == masking]
        ax.plot([r["cut"] for r in line], [r["top1_pct"] for r in line], "o-", ms=3, color=f"C{i}", label=masking)
    ax.axhline(mine[0]["chance_pct"], ls="--", color="k", lw=1, label="chance")
    ax.set(title="tiny GPT-2, talaria: probe on the complement of span(Q) (cut 0: one-hot ids)",
           xlabel="cut (to_gpu crossing, in order)", ylabel="top-1 token recovery %", ylim=(-2, 102))  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def workload_for(name: str, args: argparse.Namespace) -> Workload:
    """The workload named on the command line."""
    if name == "gpt2":
        return gpt2_workload(args.batch, args.seq, args.gpt2_train_batches, args.gpt2_test_batches)
    return minilm_workload(args.batch, args.seq, args.minilm_test_sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("gpt2", "minilm"), default=["gpt2", "minilm"])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--gpt2-train-batches", type=int, default=40)
    parser.add_argument("--gpt2-test-batches", type=int, default=20)
    parser.add_argument("--minilm-test-sentences", type=int, default=256)
    parser.add_argument("--remo-ranks", nargs="+", default=["d", "64", "32", "16", "4"],
                        help="remo ranks attacked on tiny GPT-2 under talaria ('d': full; 'none': skip)")  # fmt: skip
    args = parser.parse_args()
    ranks = [None if r == "d" else int(r) for r in args.remo_ranks if r != "none"]

    start = time.perf_counter()
    torch.manual_seed(0)
    rows, remo_rows, models = [], [], {}
    for name in args.models:
        begin = time.perf_counter()
        workload = workload_for(name, args)
        rows += attack(workload, args.scales)
        if name == "gpt2" and ranks:
            remo_rows = attack_remo(workload, ranks)
        workload.setup.update(seconds=time.perf_counter() - begin, train_tokens=len(labels(workload.train)),
                              test_tokens=len(labels(workload.test)))  # fmt: skip
        models[workload.name] = workload.setup
    elapsed = time.perf_counter() - start

    print_table(rows)
    if remo_rows:
        print("\ntalaria + remo on tiny GPT-2 (the adversary knows each cut's public basis Q):")
        print_remo_table(remo_rows)
    print(f"\n{elapsed:.0f} s in all; chance: GPT-2 1/vocab, MiniLM the majority rate (see the module docstring)")
    RESULTS.mkdir(exist_ok=True)
    setup = {"batch": args.batch, "seq": args.seq, "scales": args.scales, "seconds": elapsed,
             "torch": torch.__version__, "threads": torch.get_num_threads(), "models": models}  # fmt: skip
    result = {"setup": setup, "rows": rows, "remo_rows": remo_rows}
    (RESULTS / "attack_token_inversion.json").write_text(json.dumps(result, indent=2))
    plot(rows, RESULTS / "attack_token_inversion.png")
    if remo_rows:
        plot_remo(remo_rows, RESULTS / "attack_remo.png")


if __name__ == "__main__":
    main()
