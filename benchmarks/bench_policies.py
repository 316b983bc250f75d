"""What each policy costs, per model size: bytes crossing per token, round trips, enclave FLOP share, latency.

    python benchmarks/bench_policies.py [--seq 128] [--repeats 5]

GPT-2-shaped models with random weights at three sizes, batch 1; every policy with its own default masking
(secureinfer and auto: ring; talaria: remo at full rank; cmif: none, ε-DP tokens). Latency is the median online
call with keys made on the spot, as a ratio to eager in the same run; without a GPU, GPU stages run on the CPU.
"build s" is the time to split (for talaria it includes the GPU's one-off R = f(Q) - f(0) runs).
Writes benchmarks/results/bench_policies.json and .png.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_overhead import save_results, timed
from transformers import GPT2Config, GPT2Model

import secure_split
from secure_split import SplitConfig
from secure_split.config import POLICIES

SIZES = {"gpt2-2x128": (2, 128), "gpt2-6x384": (6, 384), "gpt2-12x768 (small)": (12, 768)}


def measure(model: torch.nn.Module, ids: torch.Tensor, policy: str, eager_s: float, repeats: int) -> dict:
    """One policy on one model: the report's counts and the latency ratio."""
    torch._dynamo.reset()
    start = time.perf_counter()
    program = secure_split.split(model, (ids,), {"use_cache": False}, SplitConfig(policy=policy))
    build_s = time.perf_counter() - start
    latency = timed(lambda: program(ids, use_cache=False), repeats)
    report = program.report()
    crossing = report.bytes_to_gpu + report.bytes_to_enclave
    return {
        "policy": policy,
        "masking": report.masking,
        "bytes_per_token": crossing / ids.numel(),
        "round_trips": report.round_trips,
        "enclave_flop_share": report.enclave_flop_share,
        "latency_ratio": latency / eager_s,
        "build_s": build_s,
        "enclave_parameters": len(program.parameter_names("enclave")),
        "gpu_parameters": len(program.parameter_names("gpu")),
        "protection": report.protection,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for label, (layers, width) in SIZES.items():
        torch.manual_seed(0)
        model = GPT2Model(GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64)).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
        with torch.no_grad():
            eager_s = timed(lambda m=model, x=ids: m(x, use_cache=False), args.repeats)
        for policy in POLICIES:
            rows.append({"model": label, **measure(model, ids, policy, eager_s, args.repeats)})
            print_row(rows[-1])
    setup = {"batch": 1, "seq": args.seq, "repeats": args.repeats, "gpu_stages_on": SplitConfig().device,
             "cost": vars(SplitConfig().cost), "threads": torch.get_num_threads()}  # fmt: skip
    save_results("bench_policies", setup, rows, plot)


def print_row(r: dict) -> None:
    print(f"{r['model']:<22}{r['policy']:<13}{r['masking']:<6}{r['bytes_per_token']:>14,.0f} B/token"
          f"{r['round_trips']:>6} trips{r['enclave_flop_share']:>9.2%} enclave FLOPs"
          f"{r['latency_ratio']:>8.2f}x eager{r['build_s']:>7.1f} s build"
          f"{r['enclave_parameters']:>5} / {r['gpu_parameters']} params enclave / gpu")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("bytes_per_token", "round_trips", "latency_ratio"),
                              ("bytes crossing per token", "round trips per call", "latency / eager (CPU)"),
                              strict=True):  # fmt: skip
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            values = [next(r[key] for r in rows if r["model"] == m and r["policy"] == policy) for m in models]
            ax.bar([x + i * width for x in range(len(models))], values, width, label=policy)
        ax.set_xticks([x + width * (len(policies) - 1) / 2 for x in range(len(models))], models, fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log" if key == "bytes_per_token" else "linear")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
