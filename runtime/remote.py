"""The enclave's client of a GPU worker: GPU stages called like modules, run remotely over KServe v2 gRPC.

Only what the caller passes crosses: the masked values of one stage call. Each request has a deadline;
a failure is a `WorkerError` naming the worker, the stage and the gRPC status (retried by the program with
fresh masks when `retryable`). An answer that does not fit the stage's declared outputs is refused."""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import urlparse

import grpc
import numpy as np
import torch

from . import kserve
from .kserve import pb, services
from .onnx_session import numpy_feeds
from .stage_backend import WorkerError
from .tls import TlsFiles, is_loopback

log = logging.getLogger("secure_split.remote")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
CLOSED_HINT = (" (a worker serving TLS closes the connection like this in the handshake with a plaintext client, "
               "and under --client-ca with a client whose certificate that CA did not sign)")  # fmt: skip


def open_channel(url: str, tls: TlsFiles | None) -> grpc.Channel:
    """A channel to "grpcs://HOST:PORT" over TLS with `tls`, or to "grpc://HOST:PORT" in plaintext. TLS settings
    with a plaintext address are refused rather than ignored, as is a grpcs:// address without them."""
    parsed = urlparse(url)
    if parsed.scheme not in ("grpc", "grpcs") or not parsed.hostname or parsed.port is None or parsed.path.strip("/"):
        raise ValueError(f"a GPU worker address is grpc://HOST:PORT or grpcs://HOST:PORT (TLS), got {url!r}")
    address = f"{parsed.hostname}:{parsed.port}"
    if parsed.scheme == "grpcs":
        if tls is None:
            raise ValueError(f"{url}: a grpcs:// worker needs tls=TlsFiles(ca=...), the CA that signed its certificate")
        return grpc.secure_channel(address, tls.credentials(), options=kserve.CHANNEL_OPTIONS)
    if tls is not None:
        raise ValueError(f"{url}: TLS files were given for a plaintext grpc:// address; use grpcs://")
    if not is_loopback(parsed.hostname):
        log.warning("GPU worker %s: the link is not encrypted (use grpcs:// and TLS files)", url)
    return grpc.insecure_channel(address, options=kserve.CHANNEL_OPTIONS)


class WorkerClient:
    """A connection to one GPU worker (or Triton); counts the bytes of every message both ways."""

    def __init__(self, url: str, timeout_s: float, tls: TlsFiles | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._channel = open_channel(url, tls)
        self._stub = services.GRPCInferenceServiceStub(self._channel)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0
        self.closed = False
        self._lock = threading.Lock()

    def metadata(self, model: str) -> Any:
        return self._call("ModelMetadata", model, pb.ModelMetadataRequest(name=model))

    def infer(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = pb.ModelInferRequest(model_name=model)
        for name, value in feeds.items():
            kind, shape, raw = kserve.encode(value)
            request.inputs.add(name=name, datatype=kind, shape=shape)
            request.raw_input_contents.append(raw)
        response = self._call("ModelInfer", model, request)
        if len(response.raw_output_contents) != len(response.outputs):
            raise WorkerError(f"GPU worker {self.url}: {model}: outputs without raw contents", retryable=False)
        try:
            return {t.name: kserve.decode(t.datatype, list(t.shape), raw)
                    for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)}  # fmt: skip
        except kserve.WireFormatError as error:
            raise WorkerError(f"GPU worker {self.url}: {model}: malformed answer: {error}", retryable=False) from error

    def close(self) -> None:
        self.closed = True
        self._channel.close()

    def _call(self, method: str, model: str, request: Any) -> Any:
        if self.closed:
            raise WorkerError(f"GPU worker {self.url}: {method} {model}: the connection was closed", retryable=False)
        try:
            response = getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details:
                details += CLOSED_HINT  # the client's only sign of a handshake the worker refused
            raise WorkerError(
                f"GPU worker {self.url}: {method} {model}: {code.name}: {details}", code in RETRYABLE
            ) from error
        with self._lock:
            self.requests += 1
            self.bytes_sent += request.ByteSize()
            self.bytes_received += response.ByteSize()
        return response


class RemoteStage(torch.nn.Module):
    """A GPU stage served by a worker under `model`, called like the stage (positional inputs, tuple out)."""

    def __init__(self, client: WorkerClient, model: str, input_names: list[str]) -> None:
        super().__init__()
        self.client = client
        self.model = model
        self.input_names = input_names
        meta = client.metadata(model)
        self.used = {t.name for t in meta.inputs}  # the exporter drops inputs nothing reads
        self.outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
        unknown = self.used - set(input_names)
        if unknown:
            raise WorkerError(f"GPU worker {client.url}: {model} takes inputs {sorted(unknown)} this stage "
                              f"does not have: a different bundle?", retryable=False)  # fmt: skip

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        answer = self.client.infer(self.model, numpy_feeds(self.input_names, inputs, self.used))
        results = []
        for name, kind, shape in self.outputs:
            value = answer.get(name)
            if value is None or kserve.datatype(value) != kind or list(value.shape) != shape:
                got = "nothing" if value is None else f"{kserve.datatype(value)}{list(value.shape)}"
                raise WorkerError(f"GPU worker {self.client.url}: {self.model} answered {got} for {name}, "
                                  f"expected {kind}{shape}", retryable=False)  # fmt: skip
            results.append(torch.from_numpy(value))
        return tuple(results)
