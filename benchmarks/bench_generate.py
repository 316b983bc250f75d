"""Generation: secure_split (split prefill and decode, KV cache in the enclave) vs eager `model.generate`.

    python benchmarks/bench_generate.py [--new 32] [--prompt 32]

GPT-2-small-sized model (12 layers, width 768, random weights), batch 1, greedy. Both sides run once to warm up
(secure_split builds its programs then), then once timed. Prefill and decode are timed separately; decode is
per generated token. Ring masking, keys made on the spot, GPU stages on this CPU. A network link adds
round trips x RTT per token: the modelled decode latency is shown for several RTTs.
Writes benchmarks/results/bench_generate.json and .png.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_overhead import save_results
from transformers import GPT2Config, GPT2LMHeadModel

from secure_split import SplitConfig, SplitGenerator

RTTS_MS = (0.0, 0.1, 1.0, 10.0)


def eager_times(model: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """Eager prefill seconds, decode seconds per token, and the greedy output."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, do_sample=False)  # warm-up
        start = time.perf_counter()
        model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
        total = time.perf_counter() - start
    return prefill, (total - prefill) / (new - 1), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--bucket", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt))
    eager_prefill, eager_decode, expected = eager_times(model, ids, args.new)
    generator = SplitGenerator(model, SplitConfig(), bucket=args.bucket)
    start = time.perf_counter()
    generator.generate(ids, args.new)  # builds the prefill and decode programs
    build_s = time.perf_counter() - start
    generator.stats = type(generator.stats)()
    out = generator.generate(ids, args.new)
    stats = generator.stats
    per_token = stats.per_token()
    decode = stats.decode_s / stats.tokens
    rows = [{
        "eager_prefill_ms": 1e3 * eager_prefill, "split_prefill_ms": 1e3 * stats.prefill_s,
        "prefill_ratio": stats.prefill_s / eager_prefill, "eager_decode_ms_per_token": 1e3 * eager_decode,
        "split_decode_ms_per_token": 1e3 * decode, "decode_ratio": decode / eager_decode,
        "eager_tokens_per_s": 1 / eager_decode, "split_tokens_per_s": 1 / decode,
        "identical": torch.equal(out, expected),
        "first_run_s_with_builds": build_s, "programs": len(generator.programs), **per_token,
        "decode_ms_per_token_at_rtt": {str(rtt): 1e3 * decode + per_token["round_trips"] * rtt for rtt in RTTS_MS},
    }]  # fmt: skip
    r = rows[0]
    print(f"prefill ({args.prompt} tokens): eager {r['eager_prefill_ms']:.1f} ms, secure_split "
          f"{r['split_prefill_ms']:.1f} ms ({r['prefill_ratio']:.2f}x)")
    print(f"decode per token: eager {r['eager_decode_ms_per_token']:.1f} ms ({r['eager_tokens_per_s']:.1f} tok/s), "
          f"secure_split {r['split_decode_ms_per_token']:.1f} ms ({r['split_tokens_per_s']:.1f} tok/s, "
          f"{r['decode_ratio']:.2f}x)")
    print(f"per token: {r['round_trips']:.0f} round trips, {r['bytes_to_gpu']:,.0f} B to GPU, "
          f"{r['bytes_to_enclave']:,.0f} B back, enclave FLOP share {r['enclave_flop_share']:.2%}")
    print("decode ms/token with a link of RTT: " + ", ".join(f"{k} ms -> {v:.1f}"
                                                          for k, v in r["decode_ms_per_token_at_rtt"].items()))
    print(f"token-identical to eager greedy: {r['identical']}; {r['programs']} programs; first run {build_s:.1f} s")
    setup = {"layers": 12, "width": 768, "prompt": args.prompt, "new": args.new, "bucket": args.bucket,
             "masking": "ring", "threads": torch.get_num_threads(), "gpu_stages_on": "cpu"}  # fmt: skip
    save_results("bench_generate", setup, rows, plot)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rows[0]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    rtts = list(r["decode_ms_per_token_at_rtt"])
    ax.bar(["eager"] + [f"split\nRTT {k} ms" for k in rtts],
           [r["eager_decode_ms_per_token"]] + [r["decode_ms_per_token_at_rtt"][k] for k in rtts])  # fmt: skip
    ax.set_ylabel("decode ms per token")
    ax.set_yscale("log")
    ax.set_title("GPT-2-small-sized, greedy decode (CPU; RTT modelled)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
