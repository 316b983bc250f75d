"""`secure-split inspect` and `PartitionReport.draw`, on tiny models (real splits, nothing mocked)."""

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch

import secure_split
from secure_split import SplitConfig
from secure_split.cli import build_model, main
from secure_split.draw import format_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = ("masking", "enclave nodes", "GPU nodes", "stages", "round trips", "cuts", "bytes to GPU",
            "bytes to enclave", "enclave FLOP share", "protection")  # fmt: skip


def expected_column(model_name: str, policy: str) -> dict[str, str]:
    """What `inspect` must show for `policy`: the numbers of that policy's own split."""
    torch._dynamo.reset()
    model, args, kwargs = build_model(model_name)
    data = secure_split.split(model, args, kwargs, SplitConfig(policy=policy)).report().to_dict()
    return {
        "masking": data["masking"],
        "enclave nodes": f"{data['enclave_nodes']:,}",
        "GPU nodes": f"{data['gpu_nodes']:,}",
        "stages": f"{data['stages']:,}",
        "round trips": f"{data['round_trips']:,}",
        "cuts": f"{data['cuts']:,}",
        "bytes to GPU": f"{data['bytes_to_gpu']:,}",
        "bytes to enclave": f"{data['bytes_to_enclave']:,}",
        "enclave FLOP share": f"{data['enclave_flop_share']:.2%}",
        "protection": ", ".join(f"{k}: {v}" for k, v in sorted(data["protection"].items())),
    }


def parse_table(out: str) -> dict[str, dict[str, str]]:
    """The printed table as {policy: {row label: cell}}; columns are separated by two or more spaces."""
    lines = out.splitlines()
    policies = re.split(r"\s{2,}", lines[1].strip())
    columns: dict[str, dict[str, str]] = {p: {} for p in policies}
    for line in lines[2 : 2 + len(ROW_KEYS)]:
        label, *cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(policies), line
        for policy, cell in zip(policies, cells, strict=True):
            columns[policy][label] = cell
    return columns


def test_inspect_prints_one_column_per_policy_with_the_report_numbers(capsys):
    policies = ["secureinfer", "cmif", "talaria"]
    assert main(["inspect", "--model", "bert", "--policies", ",".join(policies)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("secure-split inspect: tiny bert (random weights), input_ids 2 x 16")
    table = parse_table(out)
    assert list(table) == policies
    for policy in policies:
        assert table[policy] == expected_column("bert", policy), policy
    assert table["secureinfer"]["protection"] == f"ring: {table['secureinfer']['cuts']}"
    assert table["talaria"]["protection"] == f"remo: {table['talaria']['cuts']}"


def test_inspect_shows_an_invalid_policy_in_its_column(capsys):
    assert main(["inspect", "--model", "gpt2", "--policies", "bogus"]) == 0
    out = capsys.readouterr().out
    assert parse_table(out) == {"bogus": dict.fromkeys(ROW_KEYS, "invalid")}
    assert "bogus: ValueError: SplitConfig.policy must be one of" in out


def test_inspect_rejects_an_unknown_model():
    with pytest.raises(SystemExit):
        main(["inspect", "--model", "resnet"])


def test_inspect_draws_one_svg_per_split_policy(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["inspect", "--model", "gpt2", "--policies", "secureinfer,talaria,bogus", "--draw", out]) == 0
    drawn = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert drawn == ["gpt2_secureinfer.svg", "gpt2_talaria.svg"]  # an invalid policy: nothing to draw
    printed = capsys.readouterr().out
    for name in drawn:
        assert ET.parse(tmp_path / "out" / name).getroot().tag.endswith("svg")
        assert f"drew {tmp_path / 'out' / name}" in printed


@pytest.fixture(scope="module")
def gpt2_report():
    torch._dynamo.reset()
    model, args, kwargs = build_model("gpt2")
    return secure_split.split(model, args, kwargs, SplitConfig()).report()


def test_report_graph_matches_the_counts_and_every_cut_is_on_an_edge(gpt2_report):
    graph = gpt2_report.graph
    ops = [n for n in graph.nodes if n.kind == "op"]
    assert sum(n.side == "enclave" for n in ops) == gpt2_report.enclave_nodes
    assert sum(n.side == "gpu" for n in ops) == gpt2_report.gpu_nodes
    assert {i for e in graph.edges for i in e.cuts} == {c["index"] for c in gpt2_report.cut_table}
    for edge in graph.edges:
        if graph.nodes[edge.src].side != graph.nodes[edge.dst].side:
            assert edge.cuts, (graph.nodes[edge.src], graph.nodes[edge.dst])
    data = gpt2_report.to_dict()
    assert "graph" not in data
    json.dumps(data)


def test_draw_svg_labels_every_cut_with_its_bytes(gpt2_report, tmp_path):
    path = gpt2_report.draw(str(tmp_path / "split.svg"))
    assert path == tmp_path / "split.svg"
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    text = " ".join("".join(el.itertext()) for el in root.iter() if el.tag.endswith("text"))
    for cut in gpt2_report.cut_table:
        assert format_bytes(cut["bytes"]) in text
    assert "policy secureinfer, masking ring" in text


def test_draw_png(gpt2_report, tmp_path):
    path = gpt2_report.draw(tmp_path / "split.PNG")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_draw_rejects_other_formats(gpt2_report, tmp_path):
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        gpt2_report.draw(tmp_path / "split.pdf")
    assert not (tmp_path / "split.pdf").exists()


def test_format_bytes():
    sizes = (999, 16_384, 1_234_567, 3_000_000_000)
    assert [format_bytes(n) for n in sizes] == ["999 B", "16.4 kB", "1.2 MB", "3.0 GB"]


def test_export_and_run_a_bundle_from_a_config(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32,
                                  "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 100}))  # fmt: skip
    bundle, repo = tmp_path / "bundle", tmp_path / "triton"
    command = ["export", "--config", str(config), "--out", str(bundle), "--seq", "8", "--triton-repo", str(repo)]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert f"wrote {bundle}:" in out and f"signed with the key in {bundle}.key" in out
    _check_triton_repository(bundle, repo)
    assert main(["run", str(bundle), "--key", f"{bundle}.key"]) == 0
    out = capsys.readouterr().out
    assert "input_ids (2, 8), attention_mask (2, 8)" in out
    errors = [float(e) for e in re.findall(r"max \|bundle - eager\| = (\S+)", out)]
    assert len(errors) == 2 and max(errors) < 5e-4  # last_hidden_state and pooler_output, ring masking


def _check_triton_repository(bundle, repo):
    """One model per GPU stage, the stage file itself, and a config.pbtxt declaring its inputs and outputs."""
    import onnxruntime

    manifest = json.loads((bundle / "manifest.json").read_text())
    gpu = [s for s in manifest["buckets"][0]["stages"] if s["side"] == "gpu"]
    assert sorted(p.name for p in repo.iterdir()) == sorted(s["name"] for s in gpu)
    for stage in gpu:
        model = repo / stage["name"] / "1" / "model.onnx"
        assert model.read_bytes() == (bundle / stage["file"]).read_bytes()
        config = (repo / stage["name"] / "config.pbtxt").read_text()
        assert f'name: "{stage["name"]}"' in config and 'backend: "onnxruntime"' in config
        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        declared = re.findall(r'name: "(\w+)" data_type: TYPE_INT64 dims: \[ ([\d, ]+) \]', config)
        actual = [(v.name, ", ".join(map(str, v.shape))) for v in [*session.get_inputs(), *session.get_outputs()]]
        assert declared == actual
