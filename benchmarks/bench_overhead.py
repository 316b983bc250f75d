"""Overhead of secure_split vs eager on a GPT-2-small-sized model (12 layers, 768 wide, random weights).

Everything is measured in one run on one machine, and reported as ratios to eager:

    python benchmarks/bench_overhead.py [--layers 12] [--seq 128] [--repeats 10]

Modes: eager; secure_split with masking none / float / ring, each ring and float mode twice: "online" (the
pool is empty, so every call also makes its masks and unmask terms) and "pool" (keys precomputed by
`precompute()`: the online phase alone), plus the offline cost per call (precompute time / calls), the pool's
memory per call, ring with the limb kernel that CUDA uses, and ring with verify=True. Ring values cross as
int64, so ring moves twice the bytes of float32 masking.

Writes benchmarks/results/bench_overhead.json and .png. Without a GPU, GPU stages run on the CPU, so the
ratio shows the cost of splitting (crossings, masking, unmask terms), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2Model

import secure_split
from secure_split import SplitConfig

RESULTS = Path(__file__).parent / "results"


def save_results(name: str, setup: dict, rows: list[dict], plot: Callable[[list[dict], Path], None]) -> None:
    """benchmarks/results/<name>.json (setup and rows) and <name>.png (drawn by `plot`)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    plot(rows, RESULTS / f"{name}.png")


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


MODES = [  # (label, SplitConfig options, keys from a filled pool, slow: measured --slow-repeats times)
    ("none", {"masking": "none"}, False, False),
    ("float online", {"masking": "float"}, False, False),
    ("float pool", {"masking": "float"}, True, False),
    ("ring online", {"masking": "ring"}, False, False),
    ("ring pool", {"masking": "ring"}, True, False),
    ("ring pool, limbs", {"masking": "ring", "ring_kernel": "limbs"}, True, True),
    ("ring pool, verify", {"masking": "ring", "verify": True}, True, True),
]


def measure(model, ids, kwargs: dict, config: SplitConfig, pooled: bool, repeats: int) -> dict:
    """Latency (median), offline cost per call and what crosses, for one configuration."""
    start = time.perf_counter()
    program = secure_split.split(model, (ids,), kwargs, config)
    build_s = time.perf_counter() - start
    offline_ms = None
    if pooled:
        start = time.perf_counter()
        program.precompute(repeats + 1)  # the warm-up call and the timed ones
        offline_ms = (time.perf_counter() - start) / (repeats + 1) * 1e3
    latency = timed(lambda: program(ids, **kwargs), repeats)
    report = program.report()
    assert not pooled or report.keys_made_online == 1, "the timed calls must all take pooled keys"
    output = program(ids, **kwargs).last_hidden_state
    return {
        "latency_ms": latency * 1e3,
        "offline_ms_per_call": offline_ms,
        "pool_mb_per_call": report.pool_bytes_per_call / 1e6 if config.masking != "none" else 0.0,
        "build_s": build_s,
        "bytes_to_gpu": report.bytes_to_gpu,
        "bytes_to_enclave": report.bytes_to_enclave,
        "round_trips": report.round_trips,
        "cuts": report.cuts,
        "enclave_flop_share": report.enclave_flop_share,
        "output": output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slow-repeats", type=int, default=3, help="for the limb-kernel and verify modes")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64)
    model = GPT2Model(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.seq))
    kwargs = {"use_cache": False}
    device = SplitConfig().device

    with torch.no_grad():
        reference = model(ids, **kwargs).last_hidden_state
        eager_s = timed(lambda: model(ids, **kwargs), args.repeats)
    rows = [{"mode": "eager", "latency_ms": eager_s * 1e3, "ratio_vs_eager": 1.0}]
    for label, options, pooled, slow in MODES:
        repeats = args.slow_repeats if slow else args.repeats
        row = measure(model, ids, kwargs, SplitConfig(**options), pooled, repeats)
        row.update(mode=label, ratio_vs_eager=row["latency_ms"] / (eager_s * 1e3), repeats=repeats)
        row["max_abs_error"] = row.pop("output").sub(reference).abs().max().item()
        rows.append(row)
        torch._dynamo.reset()

    print_table(rows, args, device)
    setup = {"layers": args.layers, "width": args.width, "batch": 1, "seq": args.seq, "gpu_stages_on": device,
             "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    save_results("bench_overhead", setup, rows, lambda r, path: plot(r, path, setup))


def print_table(rows: list[dict], args, device: str) -> None:
    print(f"GPT-2-small-sized ({args.layers} layers, width {args.width}), batch 1, seq {args.seq}; "
          f"GPU stages on {device}; median of {args.repeats} ({args.slow_repeats} for limbs and verify)")  # fmt: skip
    header = f"{'mode':<20}{'online ms':>10}{'x eager':>9}{'offline ms':>11}{'pool MB':>9}{'MB to GPU':>11}" \
             f"{'MB back':>9}{'trips':>7}{'enclave FLOPs':>15}{'max err':>10}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        extra = ""
        if "round_trips" in r:
            offline = "-" if r["offline_ms_per_call"] is None else f"{r['offline_ms_per_call']:.1f}"
            extra = (f"{offline:>11}{r['pool_mb_per_call']:>9.1f}{r['bytes_to_gpu'] / 1e6:>11.2f}"
                     f"{r['bytes_to_enclave'] / 1e6:>9.2f}{r['round_trips']:>7}{r['enclave_flop_share']:>15.2%}"
                     f"{r['max_abs_error']:>10.1e}")  # fmt: skip
        print(f"{r['mode']:<20}{r['latency_ms']:>10.1f}{r['ratio_vs_eager']:>9.2f}{extra}")


def plot(rows: list[dict], path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = [r["mode"] for r in rows]
    ratios = [r["ratio_vs_eager"] for r in rows]
    ax.barh(names, ratios, color=["#888" if n == "eager" else "#c73" if "ring" in n else "#37c" for n in names])
    for y, v in enumerate(ratios):
        ax.text(v, y, f" {v:.2f}x", va="center")
    ax.set_xlim(0, max(ratios) * 1.15)
    ax.set_xlabel("online latency / eager latency (same run)")
    ax.set_title(f"GPT-2-small-sized, seq {setup['seq']}, GPU stages on {setup['gpu_stages_on']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
