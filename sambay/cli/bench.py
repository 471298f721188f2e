"""`sambay bench decode | prefill | serve | generation | memory`: the flags, turned into calls of
sambay.bench.

    sambay bench decode --preset phi4-mini-flash --quantize int8 --context 8192
    sambay bench prefill --lengths 512
    sambay bench serve --clients 1,32
    sambay bench generation --models phi4-mini-flash-scaled,phi4-mini-scaled

A preset always runs with random weights here (speed does not depend on them); --random-weights
gives a model folder random weights of its shape too.
"""

from __future__ import annotations

import argparse
import os
import re

from sambay.bench.decode import bench_decode
from sambay.bench.generation import DEFAULT_MODELS, bench_generation, bench_memory
from sambay.bench.prefill import bench_prefill
from sambay.bench.serve import bench_scenarios, bench_serve
from sambay.errors import SambayError

# The `sambay serve` flags `bench serve` passes on to the server it starts (None: the server's default,
# which also follows the server's SAMBAY_* environment variables).
SERVE_FLAGS = ("model", "dtype", "quantize", "random_weights", "max_batch_size", "max_model_len")
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def add_bench(bench: argparse.ArgumentParser) -> None:
    bench.description = ("Measure decode and prefill speed against this machine's limits, the server's speed "
                         "under concurrent clients, and SambaY against its Transformer baseline. Each prints "
                         "a table, then one JSON line.")
    bsub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    d = bsub.add_parser("decode", help="decode tokens/s and fraction of the memory-bandwidth roofline")
    _model_flags(d)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--context", type=int, default=0, help="tokens already in the state before timing")
    d.add_argument("--tokens", type=int, default=32,
                   help="decode steps to time (default 32, so that the median holds against noisy neighbours)")
    d.add_argument("--warmup", type=int, default=2)
    d.set_defaults(func=run_decode)

    p = bsub.add_parser("prefill", help="prefill tokens/s for several prompt lengths")
    _model_flags(p)
    p.add_argument("--lengths", default="128,512,2048")
    p.add_argument("--chunk", type=int, default=512, help="tokens per prefill call")
    p.set_defaults(func=run_prefill)

    s = bsub.add_parser(
        "serve", help="aggregate tokens/s of `sambay serve` with 1, then N concurrent streaming clients",
        description="Start `sambay serve` on a free loopback port (or use --url), have each count of "
                    "--clients stream --tokens greedy tokens at once, print tokens/s per count, stop the server.")
    s.add_argument("--clients", default="1,32", metavar="N,N,...",
                   help="comma-separated client counts (default 1,32)")
    s.add_argument("--tokens", type=int, default=64, metavar="N", help="tokens each client generates (default 64)")
    s.add_argument("--url", help="measure this running server instead of starting one")
    s.add_argument("--api-key", default=os.environ.get("SAMBAY_API_KEY"), metavar="KEY",
                   help="the server's API key; given to the server started [env SAMBAY_API_KEY]")
    s.add_argument("--model", metavar="PATH|REPO|PRESET", help="model folder, Hugging Face repo id, or preset "
                   "with --random-weights (default: the embedded model)")
    s.add_argument("--random-weights", action="store_true", help="random weights of the model's shape")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the checkpoint's)")
    s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights after loading")
    s.add_argument("--max-batch-size", type=int, metavar="N",
                   help="requests the server decodes together (its default: 8)")
    s.add_argument("--max-model-len", type=int, metavar="N", help="tokens per request, prompt + completion")
    s.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="the server's CPU threads (same as `sambay --threads N bench serve`)")
    s.add_argument("--scenarios", action="store_true",
                   help="instead of --clients: (1) a --prompt-tokens prompt arriving while 4 streams decode, "
                        "each stream's largest gap with --prefill-chunk and with the prompt prefilled whole; "
                        "(2) a chat's second turn over --history-tokens, time to first token with the prefix "
                        "cache and without; (3) n = 4 against n = 1")
    s.add_argument("--prompt-tokens", type=int, default=4096, metavar="N",
                   help="--scenarios: the long prompt (default 4096; at most the context less 2)")
    s.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="--scenarios: the server's --prefill-chunk in scenario 1 (default 256)")
    s.add_argument("--history-tokens", type=int, default=2000, metavar="N",
                   help="--scenarios: the chat's first message (default 2000)")
    s.add_argument("--prefix-cache-mb", type=float, default=512.0, metavar="MB",
                   help="--scenarios: the server's prefix cache where it is on (default 512)")
    s.set_defaults(func=run_serve)

    g = bsub.add_parser(
        "generation", help="SambaY vs its Transformer baseline: latency and throughput vs generation length",
        description="Generate with each of two models (SambaY first, then its baseline) at batch 1 and at "
                    "the largest batch whose decode state fits --memory-budget next to the weights; "
                    "report latency and throughput at each length, their ratios next to the paper's, "
                    "two PNG figures, then one JSON line.")
    g.add_argument("--models", default=DEFAULT_MODELS, metavar="A,B",
                   help=f"SambaY model, then baseline: presets or model folders (default {DEFAULT_MODELS})")
    g.add_argument("--prompt", type=int, default=512, metavar="P",
                   help="prompt tokens (default 512; the paper uses 2048)")
    g.add_argument("--lengths", default="256,512,1024,2048", metavar="G,G,...",
                   help="generation lengths, read off one long generation (default 256,512,1024,2048; "
                        "the paper goes to 32768)")
    g.add_argument("--memory-budget", default="1.25GiB", metavar="SIZE",
                   help="weights + decode state per model, such as 2GiB (default 1.25GiB: with the "
                        "default float32 pair, 2 Transformer rows, 23 SambaY rows)")
    _comparison_flags(g)
    g.set_defaults(func=run_generation)

    m = bsub.add_parser(
        "memory", help="prefill time and decode-state memory vs context length, for several models",
        description="For each model and context length: prefill seconds of a batch-1 prompt, and the bytes "
                    "of the real decode state holding it beside what the config's formula says. A table, "
                    "a PNG with both curves, then one JSON line.")
    m.add_argument("--models", default=DEFAULT_MODELS, metavar="A,B,...",
                   help=f"presets or model folders (default {DEFAULT_MODELS})")
    m.add_argument("--lengths", default="256,512,1024,2048,4096", metavar="N,N,...",
                   help="context lengths (default 256,512,1024,2048,4096)")
    m.add_argument("--chunk", type=int, default=512, help="prompt tokens per prefill call (default 512)")
    _comparison_flags(m)
    m.set_defaults(func=run_memory)


def _model_flags(p: argparse.ArgumentParser) -> None:
    """bench decode and prefill: one model, bfloat16 unless asked (the released checkpoint's dtype)."""
    p.add_argument("--model", help="model folder or Hugging Face repo id")
    p.add_argument("--preset", default="phi4-mini-flash", help="preset to use when --model is not given")
    p.add_argument("--random-weights", action="store_true", help="random weights (no download needed)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only int8 (every linear layer and the head) or int4 (4-bit groups, head at int8)")


def _comparison_flags(p: argparse.ArgumentParser) -> None:
    """bench generation and memory: several models, float32 unless asked."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and state (default float32: batched matmuls on CPUs without bf16 "
                        "arithmetic are many times slower in bfloat16)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only int8 (every linear layer and the head) or int4 (4-bit groups, head at int8)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights for model folders too (presets always have them)")
    p.add_argument("--seed", type=int, default=0, help="random weights and prompt tokens")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="where the PNG figures go")


# ---- the commands ------------------------------------------------------------------------------


def run_decode(args: argparse.Namespace) -> int:
    bench_decode(args.model or args.preset, dtype=args.dtype, quantize=args.quantize,
                 random_weights=args.random_weights, batch=args.batch, context=args.context,
                 tokens=args.tokens, warmup=args.warmup)
    return 0


def run_prefill(args: argparse.Namespace) -> int:
    bench_prefill(args.model or args.preset, lengths=parse_token_counts(args.lengths, sort=False),
                  dtype=args.dtype, quantize=args.quantize, random_weights=args.random_weights, chunk=args.chunk)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Without --url, `bench serve` starts `sambay serve` with the server flags given here."""
    clients = parse_client_counts(args.clients)
    if args.tokens < 1:
        raise SambayError(f"--tokens must be at least 1, got {args.tokens}")
    given = [f"--{n.replace('_', '-')}" for n in SERVE_FLAGS if getattr(args, n) not in (None, False)]
    if args.url and given:
        raise SambayError(f"{', '.join(given)} only set up the server that bench serve starts, but --url "
                          f"measures a running server as it is; drop {', '.join(given)} or drop --url")
    if args.scenarios:
        if args.url:
            raise SambayError("--scenarios starts its own servers (with and without the prefix cache); drop --url")
        for flag in ("prompt_tokens", "prefill_chunk", "history_tokens"):
            if getattr(args, flag) < 1:
                raise SambayError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        bench_scenarios(serve_args=serve_args(args), prompt_tokens=args.prompt_tokens, chunk=args.prefill_chunk,
                        history_tokens=args.history_tokens, cache_mb=args.prefix_cache_mb, api_key=args.api_key)
        return 0
    bench_serve(url=args.url, serve_args=[] if args.url else serve_args(args), clients=clients,
                tokens=args.tokens, api_key=args.api_key)
    return 0


def run_generation(args: argparse.Namespace) -> int:
    lengths = parse_token_counts(args.lengths)
    budget = parse_bytes(args.memory_budget)
    bench_generation(parse_models(args.models), memory_budget=budget, prompt=args.prompt, lengths=lengths,
                     dtype=args.dtype, quantize=args.quantize, random_weights=args.random_weights,
                     seed=args.seed, out=args.out)
    return 0


def run_memory(args: argparse.Namespace) -> int:
    lengths = parse_token_counts(args.lengths)
    bench_memory(parse_models(args.models), lengths=lengths, chunk=args.chunk, dtype=args.dtype,
                 quantize=args.quantize, random_weights=args.random_weights, seed=args.seed, out=args.out)
    return 0


# ---- flag parsing ------------------------------------------------------------------------------


def serve_args(args: argparse.Namespace) -> list[str]:
    """The `sambay serve` command line for the server `bench serve` starts."""
    out = []
    for name in SERVE_FLAGS:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        out += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if getattr(args, "threads", 0):
        out += ["--threads", str(args.threads)]
    if args.api_key:
        out += ["--api-key", args.api_key]
    return out


def parse_client_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise SambayError(f"--clients must be comma-separated client counts of at least 1, such as 1,32; "
                          f"got {text!r}")
    return counts


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SambayError(f"--models must name models separated by commas, such as "
                          f"{DEFAULT_MODELS}; got {text!r}")
    return names


def parse_token_counts(text: str, flag: str = "--lengths", sort: bool = True) -> list[int]:
    """'256,1024' -> [256, 1024], each at least 1; sorted and without repeats unless sort=False."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if sort:
        values = sorted(set(values))
    if not values or min(values) < 1:
        raise SambayError(f"{flag} must be comma-separated token counts of at least 1, such as "
                          f"256,1024,4096; got {text!r}")
    return values


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648; also GB, MiB, MB, plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS:
        raise SambayError(f"--memory-budget must be a size such as 2GiB, 1500MiB or 3GB; got {text!r}")
    return int(float(m.group(1)) * UNITS[unit])
