"""The KServe v2 / Open Inference Protocol over gRPC (`kserve.proto`): its messages, and arrays in and out of them.

Tensors travel as `raw_input_contents` / `raw_output_contents`: little-endian, row-major bytes, as Triton sends
them. Everything here is numpy: the worker needs neither torch nor the trusted runtime."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

MAX_MESSAGE_BYTES = 1 << 30  # a vocabulary-wide logits tensor is far above gRPC's 4 MiB default
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]  # fmt: skip
DATATYPES = {"BOOL": np.bool_, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}  # fmt: skip
ONNX_TYPES = {"tensor(bool)": "BOOL", "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(int32)": "INT32",
              "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32",
              "tensor(double)": "FP64"}  # fmt: skip


def _load_protocol() -> tuple[Any, Any]:
    """The generated messages and service of `kserve.proto`, compiled at import (no generated code to keep)."""
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # grpc resolves a .proto against sys.path
    try:
        return grpc.protos_and_services("secure_split_kserve.proto")
    finally:
        sys.path.remove(here)


pb, services = _load_protocol()


class WireFormatError(ValueError):
    """A tensor on the wire does not fit its declared datatype and shape."""


def datatype(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    raise WireFormatError(f"dtype {array.dtype} has no KServe v2 datatype")


def encode(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw little-endian bytes) of `array`."""
    kind = datatype(array)
    raw = np.ascontiguousarray(array, dtype=np.dtype(DATATYPES[kind]).newbyteorder("<")).tobytes()
    return kind, list(array.shape), raw


def decode(kind: str, shape: list[int] | tuple[int, ...], raw: bytes) -> np.ndarray:
    """The array that (datatype, shape, raw bytes) describe; refuses a size or datatype that does not fit."""
    if kind not in DATATYPES:
        raise WireFormatError(f"unknown datatype {kind!r}")
    if any(d < 0 for d in shape):
        raise WireFormatError(f"negative dimension in shape {list(shape)}")
    dtype = np.dtype(DATATYPES[kind]).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: numpy's int64 product wraps round to a small count
    if len(raw) != expected:
        raise WireFormatError(f"{len(raw)} bytes for a {kind} tensor of shape {list(shape)} ({expected} expected)")
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_MESSAGE_BYTES:  # numpy refuses so wide an empty array
        raise WireFormatError(f"shape {list(shape)} is wider than a message can carry")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
