import os
import sys
from pathlib import Path

# Test files live in folders mirroring the packages; the shared fixtures (tiny_models, workers) live here.
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models; keep Dynamo's per-code recompile budget from running out."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
