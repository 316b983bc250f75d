"""`secure-split export` and `secure-split run`: write an ONNX split bundle, and run one on sample input."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secure_split.runtime.tls import TlsFiles

SEED = 0  # random-weight models are rebuilt from their config with this seed, so `run` can compare with eager


def add_commands(sub: Any, models: tuple[str, ...]) -> None:
    export = sub.add_parser("export", help="split a model and write its ONNX split bundle")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=models, help="a tiny random-weight model, or all-MiniLM-L6-v2")
    source.add_argument("--config", type=Path, help="a transformers config.json (random weights, seed 0)")
    source.add_argument("--model-path", type=Path, help="a transformers model directory with weights")
    export.add_argument("--out", type=Path, required=True, help="the bundle directory (new or empty)")
    export.add_argument("--policy", default="secureinfer")
    export.add_argument("--masking", default=None)
    export.add_argument("--batch", type=int, default=2)
    export.add_argument("--seq", type=int, default=16)
    export.add_argument("--buckets", default=None, help="shapes the bundle serves, e.g. 1x32,4x128 (batch x seq)")
    export.add_argument("--triton-repo", type=Path, default=None,
                        help="also write the GPU stages as a Triton model repository here")  # fmt: skip
    export.add_argument("--key", type=Path, default=None,
                        help="the key file that signs the bundle: read, or written with a fresh key if absent "
                             "(default: a fresh one in OUT.key)")  # fmt: skip
    run = sub.add_parser("run", help="run a bundle on sample input; compare with eager when the model is at hand")
    run.add_argument("bundle", type=Path)
    run.add_argument("--key", type=Path, required=True, help="the bundle's key file (export wrote OUT.key)")
    run.add_argument("--gpu", default=None, help="run the GPU stages on this worker, grpc://HOST:PORT (TLS: grpcs://)")
    run.add_argument("--tls-ca", type=Path, default=None, help="grpcs://: the CA that signed the worker's certificate")
    run.add_argument("--tls-cert", type=Path, default=None, help="grpcs://: this client's certificate, for mutual TLS")
    run.add_argument("--tls-key", type=Path, default=None, help="grpcs://: the private key of --tls-cert")


def run_export(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    import secure_split
    from secure_split.bundle_trust import key_path

    about = _about(args)
    model, inputs = _model_and_inputs(about, args.batch, args.seq)
    config = secure_split.SplitConfig(policy=args.policy, masking=args.masking)
    with tqdm(unit="stage", desc="export") as bar:

        def progress(done: int, total: int, name: str) -> None:
            bar.total = total
            bar.set_postfix_str(name)
            bar.update(done - bar.n)

        buckets = [tuple(int(n) for n in b.split("x")) for b in args.buckets.split(",")] if args.buckets else None
        root = secure_split.export_bundle(model, (), args.out, config, inputs, progress=progress, about=about,
                                          buckets=buckets, key=args.key)  # fmt: skip
        bar.update(bar.total - bar.n)
    files = json.loads((root / "manifest.json").read_text())["files"]
    size = sum((root / f).stat().st_size for f in files)
    print(f"wrote {root}: {len(files)} files, {size / 1e6:.1f} MB, policy {args.policy}")
    key = args.key or key_path(root)
    print(f"signed with the key in {key}: keep it with the enclave (secure-split run {root} --key {key})")
    if args.triton_repo is not None:
        from secure_split.runtime.triton import export_triton_repo

        names = export_triton_repo(root, args.triton_repo)
        print(f"wrote Triton model repository {args.triton_repo}: {len(names)} models ({', '.join(names)})")


def run_bundle(args: argparse.Namespace) -> None:
    import torch

    import secure_split

    session = secure_split.load_bundle(args.bundle, gpu=args.gpu, tls=_client_tls(args), key=args.key)
    manifest = session.manifest
    about = manifest.get("model", {})
    model, inputs = _model_and_inputs(about, *_batch_and_seq(manifest)) if about else (None, _sample(manifest))
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out = session(**tensors)
    print(f"ran {args.bundle} on {', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())}")
    print(f"outputs: {', '.join(str(tuple(o.shape)) for o in out)}; GPU stages on {session.gpu_providers}")
    if model is None:
        print("the model is not at hand (no source in the manifest): no eager comparison")
        return
    with torch.no_grad():
        expected = [t for t in model(**inputs).to_tuple() if isinstance(t, torch.Tensor)]
    for i, (got, want) in enumerate(zip(out, expected, strict=True)):
        print(f"output {i}: max |bundle - eager| = {(got - want).abs().max().item():.3g}")


def _client_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files --tls-ca, --tls-cert and --tls-key name (None without any)."""
    from secure_split.runtime.tls import TlsFiles

    if args.tls_ca is None:
        if args.tls_cert is not None or args.tls_key is not None:
            raise SystemExit("secure-split run: --tls-cert and --tls-key need --tls-ca")
        return None
    return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)


def _about(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is not None:
        return {"source": "minilm" if args.model == "minilm" else "tiny", "ref": args.model}
    if args.config is not None:
        return {"source": "config", "ref": str(args.config.resolve()), "seed": SEED}
    return {"source": "path", "ref": str(args.model_path.resolve())}


def _model_and_inputs(about: dict[str, Any], batch: int, seq: int) -> tuple[Any, dict[str, Any]]:
    """The model `about` names, and example inputs for it: sentences for a tokenizer, else random ids."""
    import torch
    import transformers

    from .demo import SENTENCES, load_minilm
    from .tiny import tiny_model

    source, ref = about["source"], about["ref"]
    if source in ("minilm", "path"):
        model, tokenizer = load_minilm() if source == "minilm" else _pretrained(Path(ref))
        text = (SENTENCES * batch)[:batch]
        return model, dict(tokenizer(text, padding="max_length", max_length=seq, truncation=True, return_tensors="pt"))
    if source == "tiny":
        model = tiny_model(ref)
    else:
        torch.manual_seed(about.get("seed", SEED))
        model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(ref)).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False  # a bundle returns the model's outputs, not a KV cache
    return model, inputs


def _pretrained(path: Path) -> tuple[Any, Any]:
    import transformers

    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _batch_and_seq(manifest: dict[str, Any]) -> tuple[int, int]:
    shape = next(entry["shape"] for entry in manifest["buckets"][0]["inputs"] if len(entry["shape"]) == 2)
    return shape[0], shape[1]


def _sample(manifest: dict[str, Any]) -> dict[str, Any]:
    """Inputs of the bundle's shapes when its model is unknown: ones for masks, zeros for anything else."""
    import torch

    return {e["name"]: (torch.ones if "mask" in e["name"] else torch.zeros)(e["shape"], dtype=torch.long)
            for e in manifest["buckets"][0]["inputs"]}  # fmt: skip
