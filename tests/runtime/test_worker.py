"""Two processes on loopback: the enclave runs a bundle whose GPU stages a `secure-split gpu-worker` serves."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from tiny_models import tiny_inputs, tiny_model
from workers import start_worker

import secure_split
from secure_split import IntegrityError, SplitConfig
from secure_split.runtime.kserve import pb, services
from secure_split.runtime.manifest import model_name
from secure_split.runtime.stage_backend import WorkerError

TOLERANCE = dict(atol=5e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT bundle (ring masks, verification files), its GPU-only copy, the model and its inputs."""
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig(verify=True))
    root = secure_split.export_bundle(program, args, tmp_path_factory.mktemp("bert") / "bundle")
    gpu_only = shutil.copytree(root, root.parent / "gpu_only", ignore=shutil.ignore_patterns("enclave"))
    with torch.no_grad():
        expected = model(*args, **kwargs).last_hidden_state
    return root, gpu_only, args, kwargs["attention_mask"], expected


@pytest.fixture(scope="module")
def worker(bert, tmp_path_factory):
    log = tmp_path_factory.mktemp("requests")
    running = start_worker(bert[1], "--request-log", str(log))
    yield running, log
    running.stop()


def _session(bert, url, **options):
    return secure_split.load_bundle(bert[0], gpu=url, verify=False, key=f"{bert[0]}.key", **options)


def test_remote_equals_eager_and_the_worker_received_only_masked_values(bert, worker):
    _, _, args, mask, expected = bert
    running, log = worker
    for old in log.iterdir():
        old.unlink()
    session = _session(bert, running.url)
    with secure_split.trace_boundary() as trace:
        out = session(*args, attention_mask=mask)
    torch.testing.assert_close(out[0], expected, **TOLERANCE)
    assert session.worker.requests > 0 and session.worker.bytes_sent > 0
    received = [np.load(f) for f in sorted(log.iterdir())]
    sent = [c.tensor for c in trace.to_gpu()]
    assert len(received) == len(session.program.artifact.gpu_stages)  # one request per GPU stage, nothing else
    # what the worker got is exactly what crossed the enclave's channel, and each of it is ring-masked: a
    # value under a uniform pad in Z_2^64 is below 2^40 in magnitude with probability 2^-23, a plaintext
    # encoding (|x| ≤ activation_bound·2^frac_bits = 2^32) always is
    flat = sorted(((v.shape, v.tobytes()) for r in received for v in r.values()), key=lambda p: p[1])
    assert flat == sorted(((tuple(t.shape), t.numpy().tobytes()) for t in sent), key=lambda p: p[1])
    for r in received:
        for value in r.values():
            assert value.dtype == np.int64 and (np.abs(value) >= 2**40).mean() > 0.99


def test_the_worker_needs_no_enclave_file_and_loads_no_trusted_code(bert):
    code = (
        "import sys\n"
        "from secure_split.cli import main\n"
        "from secure_split.runtime.worker import GpuWorker\n"
        f"worker = GpuWorker({str(bert[1])!r}, ['CPUExecutionProvider'])\n"
        "print(len(worker.models), sorted(m for m in sys.modules if m.startswith('secure_split')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) == len([s for s in (bert[1] / "gpu").iterdir() if s.suffix == ".onnx"])
    assert "secure_split.runtime.worker" in out[1] and "enclave_runtime" not in out[1] and "program" not in out[1]


def test_eight_concurrent_clients(bert, worker):
    _, _, args, mask, _ = bert
    model = tiny_model("bert")
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            session = _session(bert, worker[0].url)
            for i in range(20):  # each client its own inputs: an answer sent to the wrong client would show
                gen = torch.Generator().manual_seed(k * 100 + i)
                ids = torch.randint(2, model.config.vocab_size, args[0].shape, generator=gen)
                with torch.no_grad():
                    expected = model(ids, attention_mask=mask).last_hidden_state
                torch.testing.assert_close(session(ids, attention_mask=mask)[0], expected, **TOLERANCE)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_malformed_request_gets_an_error_and_the_worker_keeps_serving(bert, worker):
    stub = services.GRPCInferenceServiceStub(grpc.insecure_channel(worker[0].url.removeprefix("grpc://")))
    stage = next(s for s in (bert[1] / "gpu").iterdir() if s.suffix == ".onnx")
    name = model_name(f"gpu/{stage.name}")
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
    good = meta.inputs[0]
    cases = {
        "unknown model": (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
        "no inputs": (pb.ModelInferRequest(model_name=name), grpc.StatusCode.INVALID_ARGUMENT),
        "wrong datatype": (_request(name, good.name, "FP32", good.shape, 4), grpc.StatusCode.INVALID_ARGUMENT),
        "wrong shape": (_request(name, good.name, "INT64", [1, *good.shape], 8), grpc.StatusCode.INVALID_ARGUMENT),
        "short bytes": (_request(name, good.name, "INT64", good.shape, 8, short=8), grpc.StatusCode.INVALID_ARGUMENT),
    }
    for what, (request, code) in cases.items():
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, timeout=10)
        assert raised.value.code() == code, what
    with _session(bert, worker[0].url) as session:
        out = session(*bert[2], attention_mask=bert[3])
    torch.testing.assert_close(out[0], bert[4], **TOLERANCE)
    with pytest.raises(WorkerError, match="the connection was closed"):
        session(*bert[2], attention_mask=bert[3])


def _request(model, name, datatype, shape, itemsize, short=0):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(bytes(int(np.prod(shape)) * itemsize - short))
    return request


def test_a_stalled_worker_is_retried_with_fresh_masks(bert, tmp_path):
    running = start_worker(bert[1], "--request-log", str(tmp_path))
    try:
        session = _session(bert, running.url, gpu_timeout_s=1.0, gpu_retries=3)
        os.kill(running.process.pid, signal.SIGSTOP)  # the first attempt's request waits in the socket
        threading.Timer(1.6, os.kill, (running.process.pid, signal.SIGCONT)).start()
        with secure_split.trace_boundary() as trace:
            out = session(*bert[2], attention_mask=bert[3])
    finally:
        running.stop()
    torch.testing.assert_close(out[0], bert[4], **TOLERANCE)
    assert session.program.executor.retried >= 1 and session.program.calls == 1
    first_cut = [c.tensor for c in trace.to_gpu() if c.stage == trace.to_gpu()[0].stage]
    assert len(first_cut) == session.program.executor.retried + 1
    for i, a in enumerate(first_cut):  # every attempt sent the same input under a mask of its own
        for b in first_cut[i + 1 :]:
            assert (a != b).float().mean() > 0.99


def test_a_killed_worker_gives_an_error_naming_it_within_the_timeout(bert):
    running = start_worker(bert[1])
    session = _session(bert, running.url, gpu_timeout_s=10.0, gpu_retries=2)
    os.kill(running.process.pid, signal.SIGSTOP)
    threading.Timer(0.5, running.process.kill).start()  # killed while the request is in flight
    start = time.perf_counter()
    with pytest.raises(WorkerError, match=f"GPU worker {running.url}: ModelInfer .*UNAVAILABLE"):
        session(*bert[2], attention_mask=bert[3])
    assert time.perf_counter() - start < 10.0
    running.stop()


def test_a_tampering_worker_is_caught_with_verify(bert):
    running = start_worker(bert[1], tampering=True)
    try:
        key = f"{bert[0]}.key"
        honest = secure_split.load_bundle(bert[0], verify=False, key=key)(*bert[2], attention_mask=bert[3])
        unchecked = secure_split.load_bundle(bert[0], gpu=running.url, verify=False, key=key)
        out = unchecked(*bert[2], attention_mask=bert[3])  # same masks; without checks the wrong answer goes through
        assert not torch.equal(out[0], honest[0])
        checked = secure_split.load_bundle(bert[0], gpu=running.url, key=key)  # exported with verify=True
        assert checked.program.config.verify
        with pytest.raises(IntegrityError, match="stage1_gpu"):
            checked(*bert[2], attention_mask=bert[3])
    finally:
        running.stop()


def test_triton_client_talks_to_the_worker(bert, worker):
    """NVIDIA's own KServe v2 client (tritonclient) against the worker: same protocol, same answer as onnxruntime."""
    stage = sorted(s for s in (bert[1] / "gpu").iterdir() if s.suffix == ".onnx")[0]
    name = model_name("gpu/" + stage.name)
    code = f"""
import numpy as np, onnxruntime, tritonclient.grpc as tc
client = tc.InferenceServerClient({worker[0].url.removeprefix("grpc://")!r})
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready({name!r})
meta = client.get_model_metadata({name!r})
x = np.random.default_rng(0).integers(-2**62, 2**62, size=[int(d) for d in meta.inputs[0].shape], dtype=np.int64)
given = tc.InferInput(meta.inputs[0].name, x.shape, "INT64")
given.set_data_from_numpy(x)
result = client.infer({name!r}, [given])
session = onnxruntime.InferenceSession({str(stage)!r}, providers=["CPUExecutionProvider"])
want = session.run(None, {{meta.inputs[0].name: x}})
for out, w in zip(meta.outputs, want):
    assert np.array_equal(result.as_numpy(out.name), w)
print(len(want))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # its own protobuf pool
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 1


def test_the_gramine_manifest_template_renders_to_toml(tmp_path):
    """As far as this machine can check the enclave's Gramine-SGX manifest: it renders, and says what it must."""
    import tomllib
    from pathlib import Path

    import jinja2

    import secure_split.enclave_runtime as enclave

    template = Path(enclave.__file__).with_name("gramine") / "secure_split_enclave.manifest.template"
    site = Path(torch.__file__).parents[1]
    values = {"entrypoint": sys.executable, "log_level": "error", "arch_libdir": "/lib/x86_64-linux-gnu",
              "bundle": str(tmp_path / "bundle"), "gpu_worker": "grpcs://10.0.0.2:8001", "sealed": str(tmp_path),
              "env": {}, "gramine": {"libos": "/usr/lib/gramine/libsysdb.so",
                                     "runtimedir": lambda: "/usr/lib/gramine/runtime"},
              "python": {"get_sys_path": lambda _: [site]}}  # fmt: skip
    manifest = tomllib.loads(jinja2.Template(template.read_text()).render(**values))
    assert manifest["loader"]["argv"][-12:] == ["run", "/bundle", "--key", "/sealed/bundle.key", "--gpu",
                                                "grpcs://10.0.0.2:8001", "--tls-ca", "/sealed/worker_ca.pem",
                                                "--tls-cert", "/sealed/client.pem", "--tls-key",
                                                "/sealed/client.key"]  # fmt: skip
    assert f"file:{tmp_path / 'bundle'}/" in manifest["sgx"]["trusted_files"]
    assert {"type": "encrypted", "path": "/sealed", "uri": f"file:{tmp_path}", "key_name": "_sgx_mrenclave"} in (
        manifest["fs"]["mounts"]
    )
