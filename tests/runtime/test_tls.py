"""The worker link: a worker that requires client certificates (mutual TLS) serves a client that has one and
refuses every other; and an answer whose shape its bytes cannot fill is a `WorkerError`, not numpy's."""

import datetime
import ipaddress
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tiny_models import TokenMlp
from workers import start_worker

import secure_split
from secure_split.cli import main
from secure_split.runtime import kserve
from secure_split.runtime.remote import WorkerClient
from secure_split.runtime.stage_backend import WorkerError
from secure_split.runtime.tls import TlsFiles
from secure_split.runtime.worker import GpuWorker, serve

TOLERANCE = dict(atol=5e-4, rtol=1e-3)
REFUSED = r"Socket closed \(a worker serving TLS closes the connection like this in the handshake"


def _issue(directory: Path, name: str, issuer=None, hosts: tuple[str, ...] = ()):
    """Write NAME.pem and NAME.key: a CA's self-signed certificate (no `issuer`), or a leaf certificate that
    `issuer` (certificate, key) signs, for `hosts` when given; returns (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer, signer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if signer is None else signer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if hosts:
        names = [x509.DNSName(hosts[0]), *(x509.IPAddress(ipaddress.ip_address(h)) for h in hosts[1:])]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(signer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a worker certificate for localhost and 127.0.0.1, a client certificate, and another CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue(directory, "ca")
    _issue(directory, "server", ca, hosts=("localhost", "127.0.0.1"))
    _issue(directory, "client", ca)
    _issue(directory, "other_ca")
    return directory


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle of `TokenMlp`, its input (by name, as `secure-split run` passes it) and the eager output."""
    torch.manual_seed(0)
    model = TokenMlp().eval()
    inputs = {"input_ids": torch.randint(0, 32, (2, 5))}
    root = secure_split.export_bundle(model, (), tmp_path_factory.mktemp("mlp") / "bundle", kwargs=inputs)
    with torch.no_grad():
        return root, inputs, model(**inputs)


def _load(bundle, **options):
    """The bundle, authenticated with the key `export_bundle` wrote next to it."""
    return secure_split.load_bundle(bundle[0], key=f"{bundle[0]}.key", **options)


@pytest.fixture(scope="module")
def worker(bundle, pki):
    """`secure-split gpu-worker` with mutual TLS: its certificate, and only clients the CA signed get in."""
    tls = ("--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key", "--client-ca", pki / "ca.pem")
    running = start_worker(bundle[0], *map(str, tls))
    yield running
    running.stop()


def test_a_client_with_its_certificate_gets_the_eager_answer(bundle, pki, worker):
    _, inputs, expected = bundle
    assert worker.url.startswith("grpcs://127.0.0.1:")
    tls = TlsFiles(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    with _load(bundle, gpu=worker.url, tls=tls) as session:
        out = session(**inputs)
        assert session.worker.requests > 0
    torch.testing.assert_close(out[0], expected, **TOLERANCE)
    torch.testing.assert_close(out[0], _load(bundle)(**inputs)[0], **TOLERANCE)


def test_secure_split_run_over_mutual_tls(bundle, pki, worker, capsys):
    run = ["run", str(bundle[0]), "--key", f"{bundle[0]}.key", "--gpu", worker.url]
    files = ["--tls-ca", pki / "ca.pem", "--tls-cert", pki / "client.pem", "--tls-key", pki / "client.key"]
    assert main([*run, *map(str, files)]) == 0
    assert f"outputs: (2, 5, 8); GPU stages on ['{worker.url}']" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="need --tls-ca"):
        main([*run, *map(str, files[2:])])


def test_a_client_without_a_certificate_is_refused(bundle, pki, worker):
    with pytest.raises(WorkerError, match=f"GPU worker {worker.url}: ModelMetadata .*UNAVAILABLE: .*{REFUSED}"):
        _load(bundle, gpu=worker.url, tls=TlsFiles(pki / "ca.pem"))


def test_a_plaintext_client_is_refused(bundle, worker):
    plain = worker.url.replace("grpcs://", "grpc://")
    with pytest.raises(WorkerError, match=f"GPU worker {plain}: ModelMetadata .*UNAVAILABLE: .*{REFUSED}"):
        _load(bundle, gpu=plain)


def test_a_client_trusting_another_ca_is_refused(bundle, pki, worker):
    tls = TlsFiles(pki / "other_ca.pem", pki / "client.pem", pki / "client.key")
    refused = f"GPU worker {worker.url}: ModelMetadata .*UNAVAILABLE: .*handshake failed.*CERTIFICATE_VERIFY_FAILED"
    with pytest.raises(WorkerError, match=refused):
        _load(bundle, gpu=worker.url, tls=tls)


def test_tls_settings_that_do_not_fit_are_refused(bundle, pki, tmp_path):
    with pytest.raises(ValueError, match="needs its private key"):
        TlsFiles(pki / "ca.pem", cert=pki / "client.pem")
    with pytest.raises(FileNotFoundError, match=r"CA certificate .*missing\.pem: no such file"):
        TlsFiles(pki / "missing.pem")
    (tmp_path / "ca.txt").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM file"):
        TlsFiles(tmp_path / "ca.txt")
    with pytest.raises(ValueError, match="needs tls=TlsFiles"):  # never a silent fallback to plaintext
        _load(bundle, gpu="grpcs://127.0.0.1:1")
    with pytest.raises(ValueError, match="plaintext grpc:// address; use grpcs://"):
        _load(bundle, gpu="grpc://127.0.0.1:1", tls=TlsFiles(pki / "ca.pem"))
    with pytest.raises(ValueError, match="secures the link to a GPU worker"):  # no worker: tls would do nothing
        _load(bundle, tls=TlsFiles(pki / "ca.pem"))
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key go together"):
        main(["gpu-worker", "--bundle", str(bundle[0]), "--tls-cert", str(pki / "server.pem")])


def test_a_plaintext_link_off_loopback_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="secure_split.remote"):
        WorkerClient("grpc://127.0.0.1:1", 1.0).close()
        WorkerClient("grpc://localhost:1", 1.0).close()
        assert not caplog.records
        WorkerClient("grpc://10.0.0.2:8001", 1.0).close()  # a channel connects on its first call: none here
    assert [r.getMessage() for r in caplog.records] == [
        "GPU worker grpc://10.0.0.2:8001: the link is not encrypted (use grpcs:// and TLS files)"
    ]


@pytest.mark.parametrize(
    ("shape", "size"), [([2**40, 2**40], 0), ([2**62, 4], 0), ([0, 2**62], 0), ([-1, 4], 16), ([3], 8)]
)
def test_decode_refuses_a_shape_its_bytes_cannot_fill(shape, size):
    with pytest.raises(kserve.WireFormatError):
        kserve.decode("FP32", shape, bytes(size))


def test_a_malformed_answer_is_a_worker_error_naming_worker_and_model(bundle):
    class HugeAnswers(GpuWorker):
        """Answers every call with a tensor of shape 2^40 x 2^40 and no bytes."""

        def _response(self, request, model, results):
            response = super()._response(request, model, results)
            del response.outputs[0].shape[:]
            response.outputs[0].shape.extend([2**40, 2**40])
            response.raw_output_contents[0] = b""
            return response

    worker = HugeAnswers(bundle[0], ["CPUExecutionProvider"])
    server, port = serve(worker, "127.0.0.1", 0)
    url, name = f"grpc://127.0.0.1:{port}", sorted(worker.models)[0]
    client = WorkerClient(url, 10.0)
    try:
        meta = client.metadata(name)
        feeds = {t.name: np.zeros([int(d) for d in t.shape], kserve.DATATYPES[t.datatype]) for t in meta.inputs}
        with pytest.raises(WorkerError, match=f"GPU worker {url}: {name}: malformed answer: 0 bytes"):
            client.infer(name, feeds)
    finally:
        client.close()
        server.stop(grace=None)
