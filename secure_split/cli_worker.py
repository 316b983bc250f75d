"""`secure-split gpu-worker`: serve a bundle's GPU stages over KServe v2 gRPC. Loads no trusted code."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc


def add_worker_command(sub: Any) -> None:
    worker = sub.add_parser("gpu-worker", help="serve a bundle's GPU stages over gRPC (KServe v2 protocol)")
    worker.add_argument("--bundle", type=Path, required=True, help="a bundle directory (its GPU files suffice)")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=8001, help="0 picks a free port (printed)")
    worker.add_argument("--providers", default=None, help="onnxruntime providers, comma-separated "
                        "(default: CUDA when this onnxruntime has it, else the CPU)")  # fmt: skip
    worker.add_argument("--threads", type=int, default=8, help="requests served at once")
    worker.add_argument("--request-log", type=Path, default=None, help="keep every tensor received, as .npz")
    worker.add_argument("--tls-cert", type=Path, default=None, help="serve over TLS with this certificate (PEM)")
    worker.add_argument("--tls-key", type=Path, default=None, help="the private key of --tls-cert (PEM)")
    worker.add_argument("--client-ca", type=Path, default=None,
                        help="mutual TLS: admit only clients with a certificate this CA signed (PEM)")  # fmt: skip


def run_worker(args: argparse.Namespace) -> None:
    from secure_split.runtime.onnx_session import onnxruntime_gpu_providers
    from secure_split.runtime.worker import GpuWorker, serve

    tls = _server_tls(args)
    providers = args.providers.split(",") if args.providers else onnxruntime_gpu_providers()
    worker = GpuWorker(args.bundle, providers, args.request_log)
    server, port = serve(worker, args.host, args.port, args.threads, tls)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1.0))
    print(f"secure-split gpu-worker: {len(worker.models)} GPU stages of {args.bundle} on {providers}, "
          f"serving {'grpc' if tls is None else 'grpcs'}://{args.host}:{port}", flush=True)  # fmt: skip
    server.wait_for_termination()


def _server_tls(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """The server credentials --tls-cert, --tls-key and --client-ca name; None (and a warning off loopback)
    without them."""
    from secure_split.runtime.tls import is_loopback, server_credentials

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("secure-split gpu-worker: --tls-cert and --tls-key go together")
    if args.tls_cert is None:
        if args.client_ca is not None:
            raise SystemExit("secure-split gpu-worker: --client-ca needs --tls-cert and --tls-key")
        if not is_loopback(args.host):
            print(f"secure-split gpu-worker: warning: serving {args.host} without TLS (see --tls-cert)",
                  file=sys.stderr, flush=True)  # fmt: skip
        return None
    return server_credentials(args.tls_cert, args.tls_key, args.client_ca)
