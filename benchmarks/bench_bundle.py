"""ONNX split bundle (onnxruntime) vs the torch runtime vs eager, on the same machine, in one run.

    python benchmarks/bench_bundle.py [--repeats 5]

Models: a GPT-2-shaped model (6 layers, width 384, random weights; batch 1, seq 128) and all-MiniLM-L6-v2 (real
weights; the demo's 3 sentences padded to 32 tokens), each under secureinfer (ring) and talaria (remo). Both
runtimes run the same split with keys made on the spot; latency is the median call after a warm-up. Without a
GPU the GPU stages of both run on the CPU. Also reported: export time, bundle size, max |bundle - eager|.
Writes benchmarks/results/bench_bundle.json and .png.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_overhead import save_results, timed
from transformers import GPT2Config, GPT2Model

import secure_split
from secure_split import SplitConfig
from secure_split.demo import SENTENCES, load_minilm


def workloads() -> dict[str, tuple[torch.nn.Module, dict]]:
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_layer=6, n_embd=384, n_head=6)).eval()
    ids = torch.randint(0, gpt2.config.vocab_size, (1, 128))
    minilm, tokenizer = load_minilm()
    text = tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="pt")
    return {"gpt2-6x384": (gpt2, {"input_ids": ids, "use_cache": False}), "all-MiniLM-L6-v2": (minilm, dict(text))}


def measure(name: str, model: torch.nn.Module, kwargs: dict, policy: str, repeats: int, tmp: Path) -> dict:
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        eager_s = timed(lambda: model(**kwargs), repeats)
        expected = model(**kwargs).last_hidden_state
    torch._dynamo.reset()
    program = secure_split.split(model, (), kwargs, SplitConfig(policy=policy))
    torch_s = timed(lambda: program(**kwargs), repeats)
    start = time.perf_counter()
    root = secure_split.export_bundle(program, (), tmp / f"{name}-{policy}")
    export_s = time.perf_counter() - start
    session = secure_split.load_bundle(root, key=f"{root}.key")
    bundle_s = timed(lambda: session(**tensors), repeats)
    error = (session(**tensors)[0] - expected).abs().max().item()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"model": name, "policy": policy, "masking": program.config.masking, "eager_ms": 1e3 * eager_s,
            "torch_runtime_x": torch_s / eager_s, "bundle_x": bundle_s / eager_s, "bundle_vs_torch": bundle_s / torch_s,
            "export_s": export_s, "bundle_mb": size / 1e6, "stages": len(program.artifact.stages),
            "max_abs_err": error}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, kwargs) in workloads().items():
            for policy in ("secureinfer", "talaria"):
                rows.append(measure(name, model, kwargs, policy, args.repeats, Path(tmp)))
                print_row(rows[-1])
    setup = {"repeats": args.repeats, "threads": torch.get_num_threads(), "gpu_stages_on": "cpu"}
    save_results("bench_bundle", setup, rows, plot)


def print_row(r: dict) -> None:
    print(f"{r['model']:<18}{r['policy']:<12}{r['eager_ms']:>8.1f} ms eager{r['torch_runtime_x']:>7.2f}x torch"
          f"{r['bundle_x']:>7.2f}x bundle{r['bundle_vs_torch']:>6.2f} bundle/torch"
          f"{r['export_s']:>7.1f} s export{r['bundle_mb']:>8.1f} MB{r['stages']:>4} stages"
          f"  err {r['max_abs_err']:.1e}")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['model']}\n{r['policy']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["torch_runtime_x"] for r in rows], 0.4, label="torch runtime")
    ax.bar([x + 0.2 for x in xs], [r["bundle_x"] for r in rows], 0.4, label="ONNX bundle (onnxruntime)")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("latency / eager (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
