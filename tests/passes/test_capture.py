"""Capture through `torch.export` (split) and from Dynamo's graph (torch.compile): inputs named, state lifted."""

import pytest
import torch

import secure_split
from secure_split import SplitConfig
from secure_split.entry import InputSignatureError
from secure_split.passes.capture import HiddenInputError, StateError, argument_name
from secure_split.passes.capture_dynamo import capture_dynamo, classify_inputs
from secure_split.passes.capture_export import capture_export
from secure_split.passes.leak_audit import LeakError
from secure_split.passes.meta import PARAM_NAMES, SOURCE, WEIGHTS


class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("shift", torch.ones(8))

    def forward(self, x, mask=None):
        return self.lin(x + self.shift) * mask[..., None]


class WithProfile(torch.nn.Module):
    """Reads a tensor attribute (not a parameter nor a buffer) that the caller sets per request."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.profile = torch.zeros(8)

    def forward(self, x):
        return self.lin(x + self.profile + torch.tensor([0.5] * 8))


class CountsCalls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


GLOBAL = torch.ones(8)


class ReadsAGlobal(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x + GLOBAL)


class Scales(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, scale: float, *rest):
        return self.lin(x * scale) + sum(rest)


def placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def test_export_capture_names_user_inputs_and_lifts_state():
    x, mask = torch.randn(2, 8), torch.ones(2)
    captured, signature = capture_export(Masked(), (x,), {"mask": mask})
    assert [n.meta[SOURCE] for n in placeholders(captured)] == ["x", "mask"]
    constants = {n.meta[PARAM_NAMES]: n.meta[WEIGHTS] for n in captured.graph.nodes if n.op == "get_attr"}
    assert constants == {("lin.weight",): ("lin.weight",), ("lin.bias",): ("lin.bias",), ("shift",): ()}
    assert [(i.read, i.name, i.shape) for i in signature.inputs] == [(0, "x", (2, 8)), (1, "mask", (2,))]
    assert all(argument_name(i.name) == i.name for i in signature.inputs)
    ops = {str(n.target) for n in captured.graph.nodes if n.op == "call_function"}
    assert "aten.addmm.default" in ops and not any("assert" in op for op in ops)  # the ATen form Dynamo's gives


def test_export_and_dynamo_name_arguments_alike():
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    exported, _ = capture_export(Scales(), (x, 2.0, y), {})
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(capture_dynamo(gm, classify_inputs(gm, example_inputs), list(example_inputs)))
        return gm

    torch.compile(Scales(), backend=backend, fullgraph=True, dynamic=False)(x, 2.0, y)
    assert [n.meta[SOURCE] for n in placeholders(exported)] == ["x", "rest[0]"]
    assert sorted(n.meta[SOURCE] for n in placeholders(graphs[0])) == ["rest[0]", "x"]
    assert argument_name("rest[0]") is None and argument_name("args[1]") == "args[1]"
    assert argument_name("self.profile") is None and argument_name("global GLOBAL") is None


def test_a_written_buffer_is_refused():
    with pytest.raises(StateError, match=r"\['calls'\]"):
        capture_export(CountsCalls(), (torch.randn(2, 8),))


def test_an_attribute_tensor_is_a_private_input_read_on_each_call():
    model, x = WithProfile(), torch.randn(2, 8)
    captured, signature = capture_export(model, (x,))
    assert sorted(n.meta[SOURCE] for n in placeholders(captured)) == ["self.profile", "x"]
    assert {i.read for i in signature.inputs} == {0, "profile"}
    program = secure_split.split(model, (x,), config=SplitConfig(masking="none"))
    model.profile = torch.randn(8)  # the next request's data
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))


class Stashes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        self.stash = x * 2
        return self.lin(self.stash)


@pytest.mark.filterwarnings("ignore:The tensor attribute self.stash was assigned during export")
def test_what_forward_assigns_during_the_capture_is_not_left_on_the_model():
    model, x = Stashes(), torch.randn(2, 8)
    program = secure_split.split(model, (x,))
    assert not hasattr(model, "stash")  # export ran forward on fake tensors: none is left behind
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=5e-4, rtol=1e-3)


def test_a_tensor_from_outside_the_model_is_refused():
    with pytest.raises(HiddenInputError, match="global"):
        capture_export(ReadsAGlobal(), (torch.randn(2, 8),))


def test_a_python_number_is_refused_unless_declared_public():
    model, x = Scales(), torch.randn(2, 8)
    with pytest.raises(LeakError, match=r"\['scale'\]") as refused:
        secure_split.split(model, (x, 3.25))
    assert "3.25" not in str(refused.value)
    program = secure_split.split(model, (x, 3.25), config=SplitConfig(public_inputs=("scale",)))
    with torch.no_grad():
        torch.testing.assert_close(program(x, 3.25), model(x, 3.25))
    with pytest.raises(InputSignatureError, match="scale differs"):  # the graph holds 3.25
        program(x, 2.0)


def test_a_call_with_other_shapes_says_to_split_again():
    model = Masked()
    program = secure_split.split(model, (torch.randn(2, 8),), {"mask": torch.ones(2)})
    with pytest.raises(InputSignatureError, match=r"x is \(3, 8\).*split\(\) again"):
        program(torch.randn(3, 8), mask=torch.ones(3))
    with pytest.raises(InputSignatureError, match=r"split\(\) again"):
        program(torch.randn(2, 8))  # no mask: other arguments


def test_split_leaves_the_callers_compiled_models_compiled():
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm

    other = torch.nn.Linear(4, 4)
    compiled = torch.compile(other, backend=counting)
    y = torch.randn(2, 4)
    compiled(y)
    secure_split.split(Masked(), (torch.randn(2, 8),), {"mask": torch.ones(2)})
    compiled(y)
    assert len(compiles) == 1  # no Dynamo reset: the caller's model did not compile again
