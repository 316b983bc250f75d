"""A bundle cannot be edited into a leak: its manifest is authenticated, its boundary audited again on load, and
its file entries stay inside it (the GPU worker checks those too)."""

import json
import logging
import os
import shutil
import stat

import pytest
import torch
from tiny_models import TokenMlp

import secure_split
from secure_split import BundleError, SplitConfig
from secure_split.passes.leak_audit import LeakError
from secure_split.runtime.manifest import MAX_FILE_BYTES
from secure_split.runtime.worker import GpuWorker

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One verify=True bundle, signed with a fresh key that export_bundle writes beside it."""
    torch.manual_seed(0)
    model = TokenMlp().eval()
    ids = torch.randint(0, 32, (2, 4))
    program = secure_split.split(model, (ids,), config=SplitConfig(verify=True))
    root = secure_split.export_bundle(program, (ids,), tmp_path_factory.mktemp("trust") / "bundle")
    return model, ids, root


@pytest.fixture
def bundle(exported, tmp_path):
    """A copy of the bundle to edit, and the key file of the original."""
    _, _, root = exported
    return shutil.copytree(root, tmp_path / "bundle"), root.with_name("bundle.key")


def edit(root, change):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def first(manifest, op):
    return next(e for e in manifest["buckets"][0]["boundary"] if e["op"] == op)


def gpu_stage(manifest):
    return next(s for s in manifest["buckets"][0]["stages"] if s["side"] == "gpu")


def publish(manifest):
    first(manifest, "mask")["cut"]["protection"] = "public"


def test_the_key_file_is_private_and_outside_and_a_round_trip_with_it_equals_eager(exported):
    model, ids, root = exported
    key = root.with_name("bundle.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (root / "manifest.json.hmac").is_file()
    out = secure_split.load_bundle(root, key=key)(input_ids=ids)
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(ids), atol=1e-4, rtol=1e-4)
    out = secure_split.load_bundle(root, key=bytes.fromhex(key.read_text()))(input_ids=ids)  # the key as bytes
    torch.testing.assert_close(out[0], model(ids), atol=1e-4, rtol=1e-4)


def test_a_bundle_loaded_without_its_key_is_refused_and_says_how(bundle):
    root, _ = bundle
    with pytest.raises(BundleError, match=r"needs the bundle's key.*key=<key file>.*unauthenticated=True"):
        secure_split.load_bundle(root)


def test_a_public_protection_fails_authentication(bundle):
    root, key = bundle
    edit(root, publish)
    with pytest.raises(BundleError, match=r"manifest\.json\.hmac: the HMAC of manifest\.json does not match"):
        secure_split.load_bundle(root, key=key)


def test_unauthenticated_the_re_audit_refuses_a_public_cut_and_names_it(bundle, caplog):
    root, _ = bundle
    edit(root, publish)
    name = first(json.loads((root / "manifest.json").read_text()), "mask")["cut"]["name"]
    with caplog.at_level(logging.WARNING, "secure_split"), pytest.raises(LeakError, match=rf"cut 0 '{name}'.*'public'"):
        secure_split.load_bundle(root, unauthenticated=True)
    assert "WITHOUT authentication" in caplog.text


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda m: first(m, "mask")["cut"].update(protection="none"), r"protection 'none'; masking 'ring' requires"),
        (lambda m: first(m, "mask")["cut"].update(dtype="torch.float32"), r"crosses as torch\.float32"),
        (lambda m: first(m, "mask")["cut"].update(shape=[1], stride=[1]), r"crosses as \[1\], where stage1_gpu"),
        (lambda m: first(m, "unmask")["cut"].update(direction="to_gpu"), r"the cut of a unmask\(\) op goes to_enclave"),
        (lambda m: gpu_stage(m).update(side="enclave"), r"its stage entry says 'enclave'"),
        (lambda m: gpu_stage(m)["check"].update(reps=0), r"sound to 0 bits; verify=True needs 41"),
        (lambda m: gpu_stage(m)["check"].update(out_bounds=[2**60]), r"sound to \d+ bits; verify=True needs 41"),
        (lambda m: m.update(version=1), r"version 1; this secure_split reads version 2 only"),
    ],
)
def test_unauthenticated_edits_that_weaken_the_bundle_are_refused(bundle, change, error):
    root, _ = bundle
    edit(root, change)
    with pytest.raises((BundleError, LeakError), match=error):
        secure_split.load_bundle(root, unauthenticated=True)


def test_verify_turned_off_is_refused_when_the_caller_requires_it(bundle):
    root, key = bundle

    def unverified(manifest):
        manifest["config"]["verify"] = False
        for stage in manifest["buckets"][0]["stages"]:
            stage.pop("check", None)

    edit(root, unverified)
    with pytest.raises(BundleError, match="the manifest was edited"):
        secure_split.load_bundle(root, key=key, verify=True)
    with pytest.raises(BundleError, match=r"gpu/stage\d+_gpu\.onnx: no verification file"):
        secure_split.load_bundle(root, unauthenticated=True, verify=True)


def test_masking_none_outside_cmif_needs_the_plaintext_opt_in(bundle):
    root, _ = bundle

    def plaintext(manifest):
        manifest["config"].update(masking="none", verify=False)
        for entry in manifest["buckets"][0]["boundary"]:
            if "cut" in entry:
                entry["cut"].update(protection="none", dtype=entry["dtype"])

    edit(root, plaintext)
    with pytest.raises(BundleError, match=r"masking is 'none'.*plaintext=True"):
        secure_split.load_bundle(root, unauthenticated=True)
    secure_split.load_bundle(root, unauthenticated=True, plaintext=True)  # the baseline, asked for by name


def test_a_wrong_key_and_a_missing_tag_are_refused(bundle):
    root, key = bundle
    with pytest.raises(BundleError, match=r"signed with another key than the one given \(wrong key\)"):
        secure_split.load_bundle(root, key=os.urandom(32))
    (root / "manifest.json.hmac").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json\.hmac: missing: the manifest is not authenticated"):
        secure_split.load_bundle(root, key=key)


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname", "gpu\\x.onnx", "gpu/../../x.onnx", ""])
def test_a_file_entry_that_leaves_the_bundle_is_refused_by_loader_and_worker(bundle, name):
    root, _ = bundle
    (root.parent / "outside.onnx").write_bytes(b"x")

    def escape(manifest):
        stage = gpu_stage(manifest)
        manifest["files"][name] = manifest["files"].pop(stage["file"])
        stage["file"] = name

    edit(root, escape)
    with pytest.raises(BundleError, match=r"leaves the bundle directory|is not a relative POSIX path"):
        secure_split.load_bundle(root, unauthenticated=True)
    with pytest.raises(BundleError, match=r"leaves the bundle directory|is not a relative POSIX path"):
        GpuWorker(root, CPU)


def test_a_symlinked_stage_file_or_folder_is_refused_by_loader_and_worker(bundle, tmp_path):
    root, key = bundle
    stage = next((root / "gpu").glob("*.onnx"))
    shutil.copy(stage, tmp_path / "elsewhere.onnx")
    stage.unlink()
    stage.symlink_to(tmp_path / "elsewhere.onnx")  # the same bytes: the digest alone would pass it
    with pytest.raises(BundleError, match=f"{stage.name}: a symbolic link"):
        secure_split.load_bundle(root, key=key)
    with pytest.raises(BundleError, match=f"{stage.name}: a symbolic link"):
        GpuWorker(root, CPU)
    stage.unlink()
    shutil.move(root / "gpu", tmp_path / "gpu")
    (root / "gpu").symlink_to(tmp_path / "gpu")
    shutil.copy(tmp_path / "elsewhere.onnx", tmp_path / "gpu" / stage.name)
    with pytest.raises(BundleError, match=r"/gpu: a symbolic link"):
        secure_split.load_bundle(root, key=key)
    with pytest.raises(BundleError, match=r"/gpu: a symbolic link"):
        GpuWorker(root, CPU)


def test_an_oversized_file_is_refused_before_hashing(bundle):
    root, key = bundle
    stage = next((root / "gpu").glob("*.onnx"))
    with stage.open("ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(BundleError, match=rf"{stage.name}: \d+ bytes, the manifest records \d+ .*before hashing"):
        secure_split.load_bundle(root, key=key)
    with pytest.raises(BundleError, match="before hashing"):
        GpuWorker(root, CPU)
    os.truncate(stage, MAX_FILE_BYTES + 1)  # sparse: hashing it would read 64 GiB
    edit(root, lambda m: m["files"][f"gpu/{stage.name}"].update(size=MAX_FILE_BYTES + 1))
    with pytest.raises(BundleError, match=rf"at most {MAX_FILE_BYTES} allowed\): refused before hashing"):
        secure_split.load_bundle(root, unauthenticated=True)
    with pytest.raises(BundleError, match="refused before hashing"):
        GpuWorker(root, CPU)


def test_export_refuses_a_key_inside_the_bundle_and_an_existing_default_key(exported, tmp_path):
    _, ids, _ = exported
    program = secure_split.split(TokenMlp().eval(), (ids,))
    with pytest.raises(ValueError, match="kept outside the bundle"):
        secure_split.export_bundle(program, (ids,), tmp_path / "b", key=tmp_path / "b" / "k.key")
    (tmp_path / "c.key").write_text("00" * 32)
    with pytest.raises(FileExistsError, match=r"c\.key exists: pass export_bundle\(\.\.\., key="):
        secure_split.export_bundle(program, (ids,), tmp_path / "c")
