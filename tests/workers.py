"""GPU worker processes for the two-process tests: `secure-split gpu-worker`, or a tampering one.

Run as a script (`python tests/workers.py BUNDLE`), this file is the tampering worker: the real worker class,
serving over real gRPC, except that it adds 2^30 to one element of every stage result it returns."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from secure_split.runtime.worker import start_process


@dataclass
class Worker:
    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def start_worker(bundle: Path, *options: str, tampering: bool = False) -> Worker:
    """Start a worker on a free loopback port; returns once it serves."""
    command = [sys.executable, __file__, str(bundle)] if tampering else None
    return Worker(*start_process(bundle, *options, command=command))


def _serve_tampering(bundle: str) -> None:
    from secure_split.runtime.worker import GpuWorker, serve

    class TamperingWorker(GpuWorker):
        def _response(self, request, model, results):
            results = [r.copy() for r in results]
            for r in results:
                r.reshape(-1)[r.size // 2] += 1 << 30
            return super()._response(request, model, results)

    server, port = serve(TamperingWorker(bundle, ["CPUExecutionProvider"]), "127.0.0.1", 0)
    print(f"tampering worker serving grpc://127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    _serve_tampering(sys.argv[1])
