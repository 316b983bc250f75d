"""`torch.compile(backend="secure_split")` in a fresh interpreter that never imports the backend itself.

(The tiny models live in `secure_split.tiny`, so the package face is loaded; its lazy `__init__` loads no backend.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split

SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch
from tiny_models import tiny_inputs, tiny_model
result = {{"listed": "secure_split" in torch._dynamo.list_backends(),
          "imported_before": "secure_split.backend" in sys.modules}}
for name in ("gpt2", "llama", "bert"):
    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
        compiled = torch.compile(model, backend="secure_split", fullgraph=True, options={{}})
        out = compiled(*args, **kwargs).last_hidden_state
    result[name] = (out - ref).abs().max().item()
    torch._dynamo.reset()
result["imported_after"] = "secure_split.backend" in sys.modules
print(json.dumps(result))
"""


def test_backend_found_through_entry_point_without_import():
    script = SCRIPT.format(tests=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["listed"] and not result["imported_before"] and result["imported_after"]
    for name in ("gpt2", "llama", "bert"):
        assert result[name] < 5e-3, (name, result[name])


def test_options_reach_the_config_and_unknown_keys_fail():
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    with pytest.raises(Exception, match="unknown secure_split option"):
        torch.compile(model, backend="secure_split", fullgraph=True, options={"maskin": "float"})(*args, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="secure_split", fullgraph=True, options={"masking": "none"})
    with torch.no_grad(), secure_split.trace_boundary() as trace:
        out = compiled(*args, **kwargs).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args, **kwargs).last_hidden_state)
    assert trace.to_gpu()


def test_new_shapes_get_their_own_program():
    """A second shape makes Dynamo recompile (possibly with dynamic sizes); each concrete shape is split."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="secure_split", fullgraph=True, options={})
    for seq in (16, 12, 9):
        args, kwargs = tiny_inputs("llama", seq=seq)
        with torch.no_grad(), secure_split.trace_boundary() as trace:
            out = compiled(*args, **kwargs).last_hidden_state
            ref = model(*args, **kwargs).last_hidden_state
        torch.testing.assert_close(out, ref, atol=5e-3, rtol=1e-3)
        assert trace.to_gpu()
        assert all(seq in r.tensor.shape or 2 * seq in r.tensor.shape for r in trace.to_gpu())
