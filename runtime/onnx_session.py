"""onnxruntime sessions for stage files, opened on exactly the providers asked for (no silent CPU fallback)."""

from __future__ import annotations

from pathlib import Path

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def open_session(path: Path, providers: list[str]):
    """An `onnxruntime.InferenceSession` for `path` on `providers`; refuses to start on any other provider."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # One session per stage, run one after another, and the enclave's own work in between: threads that spin
    # between runs (onnxruntime's default) would take the cores from whatever runs next (measured: a two-process
    # MiniLM call on 2 cores took 1.0 s with the worker's threads spinning, 0.25 s without).
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


def onnxruntime_gpu_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else the CPU."""
    import onnxruntime

    return [CUDA] if CUDA in onnxruntime.get_available_providers() else [CPU]


def numpy_feeds(names: list[str], inputs: tuple, used: set[str]) -> dict:
    """A stage call's tensors as numpy feeds, by input name, for the inputs its ONNX file reads (the exporter
    drops inputs nothing reads)."""
    return {name: x.detach().cpu().contiguous().numpy() for name, x in zip(names, inputs, strict=True) if name in used}
