"""Overhead of secure_split vs eager on a GPT-2-small-sized model (12 layers, 768 wide, random weights).

Everything is measured in one run on one machine, and reported as ratios to eager:

    python benchmarks/bench_overhead.py [--layers 12] [--seq 128] [--repeats 10]

Writes benchmarks/results/bench_overhead.json and .png. Without a GPU, GPU stages run on the CPU, so the
ratio shows the cost of splitting (crossings, masking, the enclave's online unmask terms), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2Model

import secure_split
from secure_split import SplitConfig

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
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
    for masking in ("none", "float"):
        start = time.perf_counter()
        program = secure_split.split(model, (ids,), kwargs, SplitConfig(masking=masking, seed=0))
        build_s = time.perf_counter() - start
        latency = timed(lambda p=program: p(ids, **kwargs), args.repeats)
        report = program.report()
        error = (program(ids, **kwargs).last_hidden_state - reference).abs().max().item()
        rows.append({
            "mode": f"secure_split ({masking})",
            "latency_ms": latency * 1e3,
            "ratio_vs_eager": latency / eager_s,
            "build_s": build_s,
            "bytes_to_gpu": report.bytes_to_gpu,
            "bytes_to_enclave": report.bytes_to_enclave,
            "round_trips": report.round_trips,
            "cuts": report.cuts,
            "enclave_flop_share": report.enclave_flop_share,
            "max_abs_error": error,
        })  # fmt: skip
        torch._dynamo.reset()

    print_table(rows, args, device)
    RESULTS.mkdir(exist_ok=True)
    setup = {"layers": args.layers, "width": args.width, "batch": 1, "seq": args.seq, "gpu_stages_on": device,
             "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    (RESULTS / "bench_overhead.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    plot(rows, RESULTS / "bench_overhead.png", setup)


def print_table(rows: list[dict], args, device: str) -> None:
    print(f"GPT-2-small-sized ({args.layers} layers, width {args.width}), batch 1, seq {args.seq}; "
          f"GPU stages on {device}; median of {args.repeats}")  # fmt: skip
    header = f"{'mode':<24}{'latency ms':>11}{'x eager':>9}{'MB to GPU':>11}{'MB back':>9}{'trips':>7}" \
             f"{'enclave FLOPs':>15}{'max err':>10}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        extra = ""
        if "round_trips" in r:
            extra = (f"{r['bytes_to_gpu'] / 1e6:>11.2f}{r['bytes_to_enclave'] / 1e6:>9.2f}{r['round_trips']:>7}"
                     f"{r['enclave_flop_share']:>15.2%}{r['max_abs_error']:>10.1e}")  # fmt: skip
        print(f"{r['mode']:<24}{r['latency_ms']:>11.1f}{r['ratio_vs_eager']:>9.2f}{extra}")


def plot(rows: list[dict], path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["mode"] for r in rows]
    ratios = [r["ratio_vs_eager"] for r in rows]
    ax.barh(names, ratios, color=["#888", "#4a7", "#37c"][: len(rows)])
    for y, v in enumerate(ratios):
        ax.text(v, y, f" {v:.2f}x", va="center")
    ax.set_xlabel("latency / eager latency (same run)")
    ax.set_title(f"GPT-2-small-sized, seq {setup['seq']}, GPU stages on {setup['gpu_stages_on']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
