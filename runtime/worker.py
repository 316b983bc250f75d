"""The GPU worker: a bundle's GPU stages served over gRPC with the KServe v2 / Open Inference Protocol.

It loads only the manifest and the GPU stage files (public weights), checks their digests, and answers
`ModelInfer` for each stage under its model name (`manifest.model_name`). It never sees a mask, an unmask term
or a private parameter: those stay in the enclave, and this package cannot import the enclave runtime. A bad
request is answered with an error status and the worker keeps serving."""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from . import kserve
from .kserve import pb, services
from .manifest import check_files, gpu_stages, model_name, read_manifest, stage_files
from .onnx_session import open_session

log = logging.getLogger("secure_split.worker")
SERVER_NAME = "secure_split-gpu-worker"


class StageModel:
    """One GPU stage file with its session, and the inputs and outputs it declares."""

    def __init__(self, name: str, path: Path, providers: list[str]) -> None:
        self.name = name
        self.session = open_session(path, providers)
        self.inputs = [(i.name, kserve.ONNX_TYPES[i.type], list(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [(o.name, kserve.ONNX_TYPES[o.type], list(o.shape)) for o in self.session.get_outputs()]

    def feeds(self, request: Any) -> dict[str, np.ndarray]:
        """The request's tensors, checked against the stage's inputs (names, datatypes, shapes, sizes)."""
        if len(request.raw_input_contents) != len(request.inputs):
            raise kserve.WireFormatError("every input must come as raw_input_contents, one per input")
        given = {t.name: (t, raw) for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
        if sorted(given) != sorted(n for n, _, _ in self.inputs) or len(given) != len(request.inputs):
            wanted = [n for n, _, _ in self.inputs]
            raise kserve.WireFormatError(f"inputs {[t.name for t in request.inputs]} do not match {wanted}")
        feeds = {}
        for name, kind, shape in self.inputs:
            tensor, raw = given[name]
            if tensor.datatype != kind or list(tensor.shape) != shape:
                raise kserve.WireFormatError(
                    f"input {name} is {tensor.datatype}{list(tensor.shape)}, the stage takes {kind}{shape}"
                )
            feeds[name] = kserve.decode(kind, shape, raw)
        return feeds


class GpuWorker(services.GRPCInferenceServiceServicer):
    """The KServe v2 service over a bundle's GPU stages. `request_log` (a directory) keeps every tensor received."""

    def __init__(self, bundle: str | Path, providers: list[str], request_log: str | Path | None = None) -> None:
        root = Path(bundle)
        manifest = read_manifest(root)
        self.models: dict[str, StageModel] = {}
        for stage in gpu_stages(manifest):
            check_files(root, manifest["files"], only=stage_files(manifest, stage))
            name = model_name(stage["file"])
            self.models[name] = StageModel(name, root / stage["file"], providers)
        self.providers = providers
        self.request_log = Path(request_log) if request_log is not None else None
        if self.request_log is not None:
            self.request_log.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count()
        self._lock = threading.Lock()

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        from importlib.metadata import version  # the installed secure_split's (this package imports none of ours)

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=version("secure_split"))

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._model(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=["1"], platform="onnxruntime_onnx",
            inputs=[tensor(name=n, datatype=k, shape=s) for n, k, s in model.inputs],
            outputs=[tensor(name=n, datatype=k, shape=s) for n, k, s in model.outputs],
        )  # fmt: skip

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._model(request.model_name, context)
        try:
            feeds = model.feeds(request)
        except kserve.WireFormatError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{model.name}: {error}")
        self._log(model.name, feeds)
        try:
            results = model.session.run(None, feeds)
        except Exception as error:  # onnxruntime's own types: answer the client, keep serving
            log.exception("stage %s failed", model.name)
            context.abort(grpc.StatusCode.INTERNAL, f"{model.name}: onnxruntime failed: {error}")
        return self._response(request, model, results)

    def _model(self, name: str, context: grpc.ServicerContext) -> StageModel:
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {name!r}; this worker serves {sorted(self.models)}")
        return self.models[name]

    def _response(self, request: Any, model: StageModel, results: list[np.ndarray]) -> Any:
        response = pb.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
        for (name, _, _), value in zip(model.outputs, results, strict=True):
            kind, shape, raw = kserve.encode(value)
            response.outputs.add(name=name, datatype=kind, shape=shape)
            response.raw_output_contents.append(raw)
        return response

    def _log(self, model: str, feeds: dict[str, np.ndarray]) -> None:
        if self.request_log is None:
            return
        with self._lock:
            serial = next(self._serial)
        np.savez(self.request_log / f"{serial:06d}_{model}.npz", **feeds)


def serve(
    worker: GpuWorker, host: str, port: int, threads: int = 8, tls: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, int]:
    """Start serving `worker` on host:port (0: any free port), over TLS with `tls` (`tls.server_credentials`);
    returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=kserve.CHANNEL_OPTIONS)
    services.add_GRPCInferenceServiceServicer_to_server(worker, server)
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def start_process(bundle: str | Path, *options: str, command: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `secure-split gpu-worker --bundle BUNDLE --port 0 OPTIONS` (or `command`, which prints the same
    "serving grpc://HOST:PORT" line, grpcs:// over TLS) in a new process; returns the process and its URL once it
    serves."""
    if command is None:
        executable = str(Path(sys.executable).with_name("secure-split"))
        command = [executable, "gpu-worker", "--bundle", str(bundle), "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    match = re.search(r"serving (grpcs?://[\w.\-]+:\d+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"the GPU worker did not start: {line.strip()!r} {process.stderr.read().strip()}")
    return process, match.group(1)
