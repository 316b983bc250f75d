"""Two processes (enclave + GPU worker over KServe v2 gRPC on loopback) vs one, on the same machine, in one run.

    python benchmarks/bench_worker.py [--repeats 5] [--requests 8]

Model: all-MiniLM-L6-v2 (real weights; the demo's 3 sentences padded to 32 tokens) as an ONNX split bundle,
under secureinfer (ring masks) and talaria (remo masks). The same bundle runs in-process (GPU stages in this
process's onnxruntime) and two-process (`secure-split gpu-worker` in its own process). Keys come from a filled
pool, so the latency ratio is the transport's. Throughput: 1/2/4/8 concurrent clients (threads, each its own
enclave session and pool) sharing one worker, `--requests` calls each. Bytes on the wire: gRPC messages per
call, against the tensor payload that must cross (the channel's count). Without a GPU the worker runs its
stages on the CPU, on the same cores as the enclave. Writes benchmarks/results/bench_worker.json and .png.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_overhead import save_results, timed

import secure_split
from secure_split import SplitConfig
from secure_split.demo import SENTENCES, load_minilm
from secure_split.runtime.worker import start_process

CLIENTS = (1, 2, 4, 8)


def latency_row(policy: str, root: Path, url: str, inputs: dict, eager_s: float, repeats: int) -> dict:
    local = secure_split.load_bundle(root, key=f"{root}.key", precompute=repeats + 2)
    remote = secure_split.load_bundle(root, gpu=url, key=f"{root}.key", precompute=repeats + 3)
    local_s = timed(lambda: local(**inputs), repeats)
    remote_s = timed(lambda: remote(**inputs), repeats)
    sent, received, payload = remote.worker.bytes_sent, remote.worker.bytes_received, remote.program.gpu.channel
    before = (payload.bytes_to_gpu, payload.bytes_to_enclave)
    remote(**inputs)
    wire = remote.worker.bytes_sent - sent + remote.worker.bytes_received - received
    tensors = payload.bytes_to_gpu - before[0] + payload.bytes_to_enclave - before[1]
    return {"policy": policy, "eager_ms": 1e3 * eager_s, "in_process_ms": 1e3 * local_s,
            "two_process_ms": 1e3 * remote_s, "two_vs_in_process": remote_s / local_s,
            "wire_bytes_per_call": wire, "tensor_bytes_per_call": tensors, "wire_vs_tensor": wire / tensors,
            "requests_per_call": len(remote.program.artifact.gpu_stages)}  # fmt: skip


def throughput(root: Path, url: str, inputs: dict, clients: int, requests: int) -> float:
    """Calls per second of `clients` concurrent enclave sessions sharing the worker."""
    sessions = [secure_split.load_bundle(root, gpu=url, key=f"{root}.key", precompute=requests) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(session) -> None:
        barrier.wait()
        for _ in range(requests):
            session(**inputs)

    threads = [threading.Thread(target=client, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return clients * requests / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = load_minilm()
    inputs = dict(tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="pt"))
    with torch.no_grad():
        eager_s = timed(lambda: model(**inputs), args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("secureinfer", "talaria"):
            torch._dynamo.reset()
            root = secure_split.export_bundle(model, (), Path(tmp) / policy, SplitConfig(policy=policy), inputs)
            process, url = start_process(root)
            try:
                row = latency_row(policy, root, url, inputs, eager_s, args.repeats)
                for n in CLIENTS:
                    row[f"calls_per_s_{n}"] = throughput(root, url, inputs, n, args.requests)
            finally:
                process.kill()
            rows.append(row)
            print_row(row)
    setup = {"model": "all-MiniLM-L6-v2, 3 x 32 tokens", "repeats": args.repeats, "requests": args.requests,
             "cores": os.cpu_count(), "gpu_stages_on": "cpu", "transport": "gRPC, loopback"}  # fmt: skip
    save_results("bench_worker", setup, rows, plot)


def print_row(r: dict) -> None:
    rates = "  ".join(f"{n}: {r[f'calls_per_s_{n}']:.2f}/s" for n in CLIENTS)
    print(f"{r['policy']:<12}{r['eager_ms']:>7.1f} ms eager{r['in_process_ms']:>8.1f} ms in-process"
          f"{r['two_process_ms']:>8.1f} ms two-process ({r['two_vs_in_process']:.2f}x)"
          f"{r['wire_bytes_per_call']:>11,} B wire / {r['tensor_bytes_per_call']:,} B tensors"
          f" ({r['wire_vs_tensor']:.4f}x)  {rates}")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [r["in_process_ms"] for r in rows], 0.4, label="in-process")
    left.bar([x + 0.2 for x in xs], [r["two_process_ms"] for r in rows], 0.4, label="two-process (gRPC)")
    left.set_xticks(list(xs), [r["policy"] for r in rows])
    left.set_ylabel("latency per call (ms)")
    left.legend(fontsize=8)
    for r in rows:
        right.plot(CLIENTS, [r[f"calls_per_s_{n}"] for n in CLIENTS], marker="o", label=r["policy"])
    right.set_xlabel("concurrent clients")
    right.set_ylabel("calls / s (one worker)")
    right.set_xticks(list(CLIENTS))
    right.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 bundle, enclave + GPU worker on one CPU machine", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
