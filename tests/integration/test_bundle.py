"""ONNX split bundles: export → load → run equals eager; ring stays exact in onnxruntime; bad bundles are refused."""

import json
import shutil

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import BundleError, SplitConfig
from secure_split.passes.leak_audit import LeakError
from secure_split.passes.meta import CUT

POLICIES = ["secureinfer", "talaria", "cmif", "auto"]
TOLERANCE = {"secureinfer": dict(atol=5e-4, rtol=1e-3), "talaria": dict(atol=5e-3, rtol=1e-3),
             "cmif": dict(atol=1e-5, rtol=1e-5), "auto": dict(atol=5e-4, rtol=1e-3)}  # fmt: skip


def tensors(kwargs):
    return {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_round_trip_equals_eager(name, policy, tmp_path):
    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    root = secure_split.export_bundle(model, args, tmp_path / "bundle", SplitConfig(policy=policy), kwargs)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["config"]["policy"] == policy
    for stage in manifest["buckets"][0]["stages"]:
        assert (root / stage["file"]).is_file() and stage["file"].startswith(stage["side"] + "/")
    if policy == "talaria":
        assert all(s["parameters"] == [] for s in manifest["buckets"][0]["stages"] if s["side"] == "enclave")
    session = secure_split.load_bundle(root, key=f"{root}.key")
    out = session(*args, **tensors(kwargs))
    with torch.no_grad():
        expected = [t for t in model(*args, **kwargs).to_tuple() if isinstance(t, torch.Tensor)]
    assert len(out) == len(expected)
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[policy])


@pytest.mark.parametrize("policy", ["secureinfer", "talaria"])  # cmif and auto: on the tiny models above
def test_minilm_round_trip(policy, tmp_path):
    from secure_split.demo import SENTENCES, load_minilm

    model, tokenizer = load_minilm()
    kwargs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    root = secure_split.export_bundle(model, (), tmp_path / "b", SplitConfig(policy=policy), kwargs)
    out = secure_split.load_bundle(root, key=f"{root}.key")(**kwargs)
    with torch.no_grad():
        expected = model(**kwargs).last_hidden_state
    # remo's float masks of std 100 on 30,522-wide one-hot rows: measured max |Δ| 3.6e-2 (1.4 % of values beyond 5e-3)
    tolerance = {"atol": 5e-2, "rtol": 1e-2} if policy == "talaria" else {"atol": 2e-4, "rtol": 1e-3}
    torch.testing.assert_close(out[0], expected, **tolerance)
    cosine = torch.nn.functional.cosine_similarity(out[0].flatten(1), expected.flatten(1))
    assert cosine.min() > 0.9999
    if policy == "secureinfer":  # MiniLM's weights are large: stage files keep them as external data
        assert any(f.endswith(".onnx.data") for f in json.loads((root / "manifest.json").read_text())["files"])


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    """One export for the tests below, from a program (no re-split); each test works on its own copy."""
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig())
    root = secure_split.export_bundle(program, args, tmp_path_factory.mktemp("bert") / "bundle")
    return program, root, args, kwargs


@pytest.fixture
def bert_bundle(bert_export, tmp_path):
    program, root, args, kwargs = bert_export
    shutil.copy(f"{root}.key", tmp_path / "bundle.key")
    return program, shutil.copytree(root, tmp_path / "bundle"), args, kwargs


def test_ring_gpu_stages_are_bit_exact_in_onnxruntime(bert_bundle):
    """Every GPU stage file, on full-range Z_2^64 inputs, gives exactly the torch stage's integers."""
    program, root, _, _ = bert_bundle
    session = secure_split.load_bundle(root, key=f"{root}.key")
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for call in program.keys.gpu_calls:
        name = str(call.target)
        cuts = [a.meta[CUT] for a in call.args]  # in the layout the stage was traced with
        inputs = [c.empty().copy_(torch.randint(-(2**63), 2**63 - 1, c.shape, generator=gen)) for c in cuts]
        want = program.artifact.boundary.get_submodule(name)(*inputs)
        got = session.program.gpu.run(name, inputs)
        assert all(g.dtype == torch.int64 and torch.equal(g, w) for g, w in zip(got, want, strict=True)), name
        checked += 1
    assert checked == len(program.artifact.gpu_stages) > 0


def test_bundle_output_equals_the_torch_program_and_serves_the_pool(bert_bundle):
    program, root, args, kwargs = bert_bundle
    session = secure_split.load_bundle(root, key=f"{root}.key")
    assert session.program.precompute(1) == 1
    out = session(*args, **tensors(kwargs))
    flat = [kwargs["attention_mask"] if "attention_mask" in s else args[0] for s in program.artifact.input_sources]
    torch.testing.assert_close(out[0], program.run(*flat)[0], atol=1e-5, rtol=1e-5)
    assert session.program.keys.pool_calls == 1


def test_a_loaded_bundle_reports_draws_and_names_parameters_as_the_program(bert_bundle, tmp_path):
    """The report's counts, the drawing and the parameters per side are compile-time facts of the artifact,
    which the manifest keeps: a loaded bundle gives what the in-process program gives (but for call counters)."""
    program, root, args, kwargs = bert_bundle
    session = secure_split.load_bundle(root, key=f"{root}.key")
    want, got = program.report().to_dict(), session.program.report().to_dict()
    counters = ("calls", "keys_from_pool", "keys_made_online", "pool_size")  # the program has run other calls
    assert {k: v for k, v in got.items() if k not in counters} == {k: v for k, v in want.items() if k not in counters}
    assert got["enclave_nodes"] > 0 and got["gpu_flops"] > 0 and got["cut_table"]
    assert session.program.report().graph == program.report().graph and program.report().graph.nodes
    for side in ("enclave", "gpu"):
        assert session.program.parameter_names(side) == program.parameter_names(side) != []
    assert session.program.report().draw(tmp_path / "loaded.svg").stat().st_size > 0
    session(*args, **tensors(kwargs))
    assert session.program.report().calls == 1


def test_a_tampered_file_is_refused_and_named(bert_bundle):
    _, root, _, _ = bert_bundle
    target = next((root / "gpu").glob("*.onnx"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{target.name}: sha256 does not match"):
        secure_split.load_bundle(root, key=f"{root}.key")


def test_missing_extra_and_schema_errors_are_refused(bert_bundle):
    _, root, _, _ = bert_bundle
    (root / "gpu" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"extra\.onnx: not listed in the manifest"):
        secure_split.load_bundle(root, key=f"{root}.key")
    (root / "gpu" / "extra.onnx").unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: a manifest of version 99; this secure_split reads"):
        secure_split.load_bundle(root, unauthenticated=True)  # the schema is checked past the tag (test_bundle_trust)
    manifest["version"] = 2
    del manifest["buckets"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"lacks \['buckets'\]"):
        secure_split.load_bundle(root, unauthenticated=True)


def test_a_gpu_file_with_a_private_parameter_is_refused_at_export(tmp_path):
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    program = secure_split.split(model, args, kwargs, SplitConfig())  # split with no private weights
    private = SplitConfig(private=("encoder.layer.0.attention.self.query.*",))
    with pytest.raises(LeakError, match=r"gpu/stage\d+_gpu\.onnx would carry private parameter"):
        secure_split.export_bundle(program, args, tmp_path / "b", private)


def test_other_shapes_and_missing_inputs_get_a_clear_error(bert_bundle):
    _, root, args, kwargs = bert_bundle
    session = secure_split.load_bundle(root, key=f"{root}.key")
    with pytest.raises(ValueError, match="static shapes"):
        session(args[0][:, :8], attention_mask=kwargs["attention_mask"][:, :8])
    with pytest.raises(TypeError, match="needs input 'attention_mask'"):
        session(*args)


def test_a_provider_that_cannot_serve_is_an_error_not_a_fallback(bert_bundle):
    _, root, _, _ = bert_bundle
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        secure_split.load_bundle(root, key=f"{root}.key", providers=["CUDAExecutionProvider"])


def test_buckets_serve_other_batch_and_sequence_lengths(tmp_path):
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    root = secure_split.export_bundle(model, args, tmp_path / "b", SplitConfig(), kwargs,
                                      buckets=[(2, 8), (3, 12)])  # fmt: skip
    session = secure_split.load_bundle(root, key=f"{root}.key")
    axes = session.manifest["dynamic_axes"]
    assert axes["inputs"]["attention_mask"] == {"0": "batch", "1": "sequence"}
    assert axes["outputs"] == [{"0": "batch", "1": "sequence"}, {"0": "batch"}]  # hidden states, pooled
    gen = torch.Generator().manual_seed(3)
    for batch, seq in [(2, 8), (3, 10), (1, 4), (3, 12)]:  # exact buckets, and shapes padded into one
        ids = torch.randint(0, 128, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -1] = 0
        out = session(ids, attention_mask=mask)
        with torch.no_grad():
            want = model(ids, attention_mask=mask)
        torch.testing.assert_close(out[0], want.last_hidden_state, atol=5e-4, rtol=1e-3)
        torch.testing.assert_close(out[1], want.pooler_output, atol=5e-4, rtol=1e-3)
    with pytest.raises(ValueError, match=r"no bucket of this bundle holds batch 4 x seq 8"):
        session(torch.zeros(4, 8, dtype=torch.long), attention_mask=torch.ones(4, 8, dtype=torch.long))
