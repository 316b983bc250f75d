"""A bundle's GPU stages as an NVIDIA Triton Inference Server model repository (onnxruntime backend).

    <repo>/<model name>/config.pbtxt
    <repo>/<model name>/1/model.onnx (+ its external-data file, under the name model.onnx refers to)

Model names are the worker's (`manifest.model_name`), so an enclave reaches Triton with the same
`load_bundle(DIR, gpu="grpc://HOST:8001")` as it reaches `secure-split gpu-worker`."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import kserve
from .manifest import check_files, gpu_stages, model_name, read_manifest, stage_files

_TRITON_TYPES = {"BOOL": "TYPE_BOOL", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32",
                 "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64"}  # fmt: skip


def export_triton_repo(bundle: str | Path, repo: str | Path, instance_kind: str = "KIND_GPU") -> list[str]:
    """Write the GPU stages of the bundle at `bundle` as a Triton model repository at `repo`; returns the model
    names. `instance_kind` "KIND_GPU" (default) or "KIND_CPU" (a CPU-only Triton)."""
    from .onnx_session import CPU, open_session

    root, out = Path(bundle), Path(repo)
    manifest = read_manifest(root)
    names = []
    for stage in gpu_stages(manifest):
        files = stage_files(manifest, stage)
        check_files(root, manifest["files"], only=files)
        name = model_name(stage["file"])
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=False)
        for file in files:
            source = root / file
            target = "model.onnx" if file == stage["file"] else source.name  # external data keeps its name
            shutil.copyfile(source, version / target)
        session = open_session(root / stage["file"], [CPU])
        (out / name / "config.pbtxt").write_text(_config(name, session, instance_kind))
        names.append(name)
    return names


def _config(name: str, session, instance_kind: str) -> str:
    """config.pbtxt: the stage's inputs and outputs at their static shapes, no Triton batching (max_batch_size 0:
    a bundle's shapes already include the batch, and each request carries its own masks)."""

    def tensors(values) -> str:
        return ",\n".join(
            f'  {{ name: "{v.name}" data_type: {_TRITON_TYPES[kserve.ONNX_TYPES[v.type]]} '
            f"dims: [ {', '.join(str(d) for d in v.shape)} ] }}"
            for v in values
        )

    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        f"input [\n{tensors(session.get_inputs())}\n]\noutput [\n{tensors(session.get_outputs())}\n]\n"
        f"instance_group [ {{ kind: {instance_kind} count: 1 }} ]\n"
    )
