"""`secure-split gpu-worker`: serve a bundle's GPU stages over KServe v2 gRPC. Loads no trusted code."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any


def add_worker_command(sub: Any) -> None:
    worker = sub.add_parser("gpu-worker", help="serve a bundle's GPU stages over gRPC (KServe v2 protocol)")
    worker.add_argument("--bundle", type=Path, required=True, help="a bundle directory (its GPU files suffice)")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=8001, help="0 picks a free port (printed)")
    worker.add_argument("--providers", default=None, help="onnxruntime providers, comma-separated "
                        "(default: CUDA when this onnxruntime has it, else the CPU)")  # fmt: skip
    worker.add_argument("--threads", type=int, default=8, help="requests served at once")
    worker.add_argument("--request-log", type=Path, default=None, help="keep every tensor received, as .npz")


def run_worker(args: argparse.Namespace) -> None:
    from secure_split.runtime.onnx_session import onnxruntime_gpu_providers
    from secure_split.runtime.worker import GpuWorker, serve

    providers = args.providers.split(",") if args.providers else onnxruntime_gpu_providers()
    worker = GpuWorker(args.bundle, providers, args.request_log)
    server, port = serve(worker, args.host, args.port, args.threads)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1.0))
    print(f"secure-split gpu-worker: {len(worker.models)} GPU stages of {args.bundle} on {providers}, "
          f"serving grpc://{args.host}:{port}", flush=True)  # fmt: skip
    server.wait_for_termination()
