"""One stage of a split bundle, run by onnxruntime and called like the fx stage it was exported from."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from secure_split.passes.ring_lower import RING_BITS

log = logging.getLogger("secure_split")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def gpu_providers(requested: list[str] | None) -> list[str]:
    """The providers GPU stages ask for: `requested`, else CUDA when onnxruntime has it, else the CPU (logged)."""
    import onnxruntime

    if requested:
        return list(requested)
    if CUDA in onnxruntime.get_available_providers() and torch.cuda.is_available():
        return [CUDA]
    log.info("secure_split: no CUDA execution provider (onnxruntime-gpu and a GPU); GPU stages run on the CPU")
    return [CPU]


class OnnxStage(torch.nn.Module):
    """A stage file with its own onnxruntime session, opened on first use on exactly `providers`.

    A GPU stage that asks for CUDA refuses to start if onnxruntime would run it, or any of its nodes, elsewhere:
    no silent fallback to the CPU."""

    def __init__(
        self, path: Path, providers: list[str], digest: str, input_names: list[str], ring_bits: list[int] | None
    ) -> None:
        super().__init__()
        self.path = path
        self.input_names = input_names
        self.providers = providers
        self.code = f"onnx sha256 {digest}"  # what a pool's fingerprint binds to
        self.meta = {RING_BITS: ring_bits} if ring_bits is not None else {}
        self._session = None

    def open(self):
        """The onnxruntime session, opened on first use."""
        if self._session is None:
            self._session = _open(self.path, self.providers)
        return self._session

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        used = {i.name for i in self.open().get_inputs()}  # the exporter drops inputs nothing reads
        pairs = zip(self.input_names, inputs, strict=True)
        feeds = {name: x.detach().cpu().contiguous().numpy() for name, x in pairs if name in used}
        return tuple(torch.from_numpy(out) for out in self.open().run(None, feeds))


def _open(path: Path, providers: list[str]):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # A bundle opens one session per stage and runs one at a time: threads that spin between runs (the
    # default) would take the cores from the session that is running.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if providers[0] != CPU:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own types; name the file and the providers
        raise RuntimeError(f"{path}: onnxruntime could not open it on {providers}: {error}") from error
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"{path}: asked for {providers[0]}, onnxruntime runs it on {session.get_providers()}")
    return session
