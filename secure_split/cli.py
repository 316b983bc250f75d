"""The `secure-split` command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_bundle import add_commands, run_bundle, run_export
from .cli_worker import add_worker_command, run_worker

if TYPE_CHECKING:
    import torch

    from .report import PartitionReport

MODELS = ("gpt2", "llama", "bert", "minilm")
POLICIES = "secureinfer,talaria,cmif,auto"
# (row label, how to show it): the key counts of `PartitionReport`, one row each in `inspect`'s table
ROWS = (
    ("masking", lambda r: r.masking),
    ("enclave nodes", lambda r: f"{r.enclave_nodes:,}"),
    ("GPU nodes", lambda r: f"{r.gpu_nodes:,}"),
    ("stages", lambda r: f"{r.stages:,}"),
    ("round trips", lambda r: f"{r.round_trips:,}"),
    ("cuts", lambda r: f"{r.cuts:,}"),
    ("bytes to GPU", lambda r: f"{r.bytes_to_gpu:,}"),
    ("bytes to enclave", lambda r: f"{r.bytes_to_enclave:,}"),
    ("enclave FLOP share", lambda r: f"{r.enclave_flop_share:.2%}"),
    ("protection", lambda r: ", ".join(f"{k}: {v}" for k, v in sorted(r.protection.items())) or "-"),
)


def main(argv: list[str] | None = None) -> int:
    """Run the `secure-split` command line on `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = argparse.ArgumentParser(prog="secure-split", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="all-MiniLM-L6-v2 through torch.compile(backend='secure_split')")
    inspect = sub.add_parser("inspect", help="split one model under several policies and compare the partitions")
    inspect.add_argument("--model", required=True, choices=MODELS,
                         help="a tiny random-weight model, or all-MiniLM-L6-v2 with its real weights")  # fmt: skip
    inspect.add_argument("--policies", default=POLICIES, help=f"comma-separated (default: {POLICIES})")
    inspect.add_argument("--masking", default=None, help="SplitConfig.masking (default: each policy's own)")
    inspect.add_argument("--draw", metavar="DIR", type=Path, help="write DIR/<model>_<policy>.svg per policy")
    add_commands(sub, MODELS)
    add_worker_command(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo()
    elif args.command == "export":
        run_export(args)
    elif args.command == "run":
        run_bundle(args)
    elif args.command == "gpu-worker":
        run_worker(args)
    else:
        run_inspect(args.model, [p.strip() for p in args.policies.split(",") if p.strip()], args.masking, args.draw)
    return 0


def run_inspect(model_name: str, policies: list[str], masking: str | None, draw: Path | None) -> None:
    """Split `model_name` once per policy and print the reports side by side; draw each split into `draw`."""
    import secure_split

    model, args, kwargs = build_model(model_name)
    reports: dict[str, PartitionReport | str] = {}
    for policy in policies:
        try:
            config = secure_split.SplitConfig(policy=policy, **({"masking": masking} if masking else {}))
            reports[policy] = secure_split.split(model, args, kwargs, config).report()
        except (NotImplementedError, ValueError) as error:  # a policy that cannot split spoils no other column
            reports[policy] = f"{type(error).__name__}: {error}"
    print(f"secure-split inspect: {_describe(model_name, args, kwargs)}")
    print(_format_table(reports))
    if draw is not None:
        draw.mkdir(parents=True, exist_ok=True)
    for policy, report in reports.items():
        if isinstance(report, str):
            print(f"{policy}: {report}")
        elif draw is not None:
            print(f"drew {report.draw(draw / f'{model_name}_{policy}.svg')}")


def _format_table(reports: dict[str, PartitionReport | str]) -> str:
    """One column per policy, one row per key count; a policy that could not be split says why in a word."""
    table = [["", *reports]]
    for label, show in ROWS:
        table.append([label, *(_failure(r) if isinstance(r, str) else show(r) for r in reports.values())])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
        for row in table
    )


def _failure(error: str) -> str:
    """The cell for a policy whose config was refused ("invalid") or that cannot split this model."""
    return "unsupported" if error.startswith("NotImplementedError") else "invalid"


def build_model(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """The model and example inputs `inspect` splits: tiny ones from config (seeded), MiniLM from disk."""
    if name == "minilm":
        from .demo import SENTENCES, load_minilm

        model, tokenizer = load_minilm()
        return model, (), dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    from .tiny import tiny_inputs, tiny_model

    args, kwargs = tiny_inputs(name)
    return tiny_model(name), args, kwargs


def _describe(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """E.g. "tiny bert (random weights), input_ids 2 x 16"."""
    ids = args[0] if args else kwargs["input_ids"]
    weights = "all-MiniLM-L6-v2 (real weights)" if name == "minilm" else f"tiny {name} (random weights)"
    return f"{weights}, input_ids {' x '.join(str(s) for s in ids.shape)}"
