"""`sambay eval phonebook | needle | math`: the evaluation commands.

    sambay eval phonebook --lengths 512,1024,2048 --samples 20
    sambay eval needle --lengths 1k,2k --depths 0,0.5,1 --samples 5
    sambay eval math --model phi4-flash-int8 --data aime24.jsonl --samples 64 --out aime24.jsonl.out

Each loads the model like `sambay generate` does (--model folder / repo id / preset, --dtype,
--quantize), runs its rows through one batched Engine (--batch-size), shows a progress bar on
stderr, and prints a table and then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from sambay.cli.generate import load_model_flags, model_flags  # the same model flags as generate and chat
from sambay.errors import SambayError
from sambay.evals import math_eval, needle, phonebook, retrieval
from sambay.evals import quant as quant_eval
from sambay.runtime.checkpoint import load_model, resolve_model
from sambay.tokenizer import load_tokenizer
from sambay.evals.generation import engine_generate

DEFAULT_LENGTHS = "512,1024,2048"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"
DEFAULT_BATCH = 4


def add_eval(ev) -> None:
    ev.description = ("Evaluate a model: phonebook and needle retrieval at chosen context lengths, or "
                      "Pass@1 on math problems. Each prints a table, then one JSON line.")
    sub = ev.add_subparsers(dest="eval", metavar="EVAL", required=True)

    pb = sub.add_parser("phonebook", help="phonebook lookup accuracy per context length",
                        description="The Phonebook test of 'Repeat After Me' (arXiv 2402.01032): a book of "
                                    "'Full Name: 10 digits' lines, two example lookups, one query; "
                                    "greedy; right when the first output line is the number.")
    _retrieval_flags(pb, samples=20, max_new_tokens=16)
    pb.set_defaults(func=run_phonebook)

    nd = sub.add_parser("needle", help="needle-in-a-haystack accuracy per context length and depth",
                        description="RULER-style single needle: 'The special magic number for KEY is: "
                                    "NNNNNNN.' at a chosen depth of filler text; right when the number "
                                    "is in the first output line.")
    _retrieval_flags(nd, samples=5, max_new_tokens=16)
    nd.add_argument("--depths", default=DEFAULT_DEPTHS, metavar="D,D,...",
                    help=f"where the needle sits, 0 = start .. 1 = end (default {DEFAULT_DEPTHS})")
    nd.set_defaults(func=run_needle)

    mt = sub.add_parser("math", help="Pass@1 on math problems with \\boxed{} answers (resumable)",
                        description="Sample k answers per problem through the chat template, extract the "
                                    "last \\boxed{}, compare with math-verify; Pass@1 = mean fraction "
                                    "right. Results are saved per sample to --out and a rerun resumes.")
    mt.add_argument("--data", required=True, metavar="FILE.jsonl",
                    help="one JSON object a line with 'problem' (or 'question') and 'answer' (or 'solution')")
    mt.add_argument("--out", default=None, metavar="FILE.jsonl",
                    help="results file, appended per sample; rerun to resume (default: DATA-results.jsonl "
                         "in the current directory)")
    mt.add_argument("--samples", type=int, default=math_eval.DEFAULT_SAMPLES, metavar="K",
                    help=f"samples per problem (default {math_eval.DEFAULT_SAMPLES}; the model card uses 64 "
                         f"for AIME)")
    mt.add_argument("--temperature", type=float, default=math_eval.DEFAULT_TEMPERATURE, metavar="T",
                    help=f"default {math_eval.DEFAULT_TEMPERATURE} (the model card's)")
    mt.add_argument("--top-p", type=float, default=math_eval.DEFAULT_TOP_P, metavar="P",
                    help=f"default {math_eval.DEFAULT_TOP_P} (the model card's)")
    mt.add_argument("--top-k", type=int, default=0, metavar="K", help="default 0 (off)")
    mt.add_argument("--max-new-tokens", type=int, default=math_eval.DEFAULT_MAX_NEW_TOKENS, metavar="N",
                    help=f"reasoning budget per sample (default {math_eval.DEFAULT_MAX_NEW_TOKENS}; lowered "
                         f"with a warning to what the model's context leaves after the longest prompt)")
    mt.add_argument("--seed", type=int, default=0, help="sample j of problem i uses a seed made from (seed, i, j)")
    mt.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="B",
                    help=f"samples decoded together (default {DEFAULT_BATCH})")
    model_flags(mt)
    mt.set_defaults(func=run_math)

    qt = sub.add_parser("quant", help="what each weight format costs against the unquantized model",
                        description="Per weight format (int8; int4 formats, RTN absmax g32 the baseline), "
                                    "against the float32 model on held-out text: mean KL of the next-token "
                                    "distributions, top-1 agreement, perplexity change.")
    qt.add_argument("--model", default=None, help="model folder or repo id (default: the embedded model)")
    qt.add_argument("--text", required=True, metavar="FILE", help="held-out UTF-8 text")
    qt.add_argument("--formats", default=",".join(quant_eval.FORMATS), metavar="F,F,...",
                    help="int8 or int4:<fmt>[:<layers kept int8, + separated; - for none>] "
                         "(default: the measured set)")
    qt.add_argument("--window", type=int, default=256, metavar="N", help="tokens per forward window (default 256)")
    qt.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                    help="tokens of the text used (default 4096)")
    qt.set_defaults(func=run_quant)


def _retrieval_flags(p: argparse.ArgumentParser, samples: int, max_new_tokens: int) -> None:
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, metavar="N,N,...",
                   help=f"prompt lengths in the model's tokens; 4k = 4096 (default {DEFAULT_LENGTHS})")
    p.add_argument("--samples", type=int, default=samples, metavar="N",
                   help=f"questions per length (default {samples})")
    p.add_argument("--seed", type=int, default=0, help="seed of the names, numbers and filler (default 0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="B",
                   help=f"questions decoded together (default {DEFAULT_BATCH})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"most tokens per answer; it stops at the first newline anyway (default {max_new_tokens})")
    model_flags(p)


# ---- flag parsing ------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """'512,2k,32K' -> [512, 2048, 32768]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        scale = 1024 if part[-1:].lower() == "k" else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise SambayError(f"--lengths takes comma-separated token counts like 512,2k,32k; got {part!r}") from None
        if value < 1:
            raise SambayError(f"--lengths must be positive, got {part!r}")
        out.append(value)
    return out


def parse_depths(text: str) -> list[float]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise SambayError(f"--depths takes comma-separated fractions like 0,0.5,1; got {part!r}") from None
        if not 0 <= value <= 1:
            raise SambayError(f"--depths must be between 0 (start) and 1 (end), got {part}")
        out.append(value)
    return out


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise SambayError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def run_quant(args: argparse.Namespace) -> int:
    _positive(args, "window", "max_tokens")
    where = resolve_model(args.model)
    if isinstance(where, str):
        raise SambayError(f"{where!r} is a preset without trained weights; quality needs a trained model folder")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except OSError as e:
        raise SambayError(f"cannot read --text {args.text}: {e.strerror}") from None
    model = load_model(where, dtype=torch.float32)
    ids = load_tokenizer(where).encode(text)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        quant_eval.parse_format(f)  # a bad name fails before any work
    with _progress(len(formats), "formats") as bar:
        ppl, rows = quant_eval.evaluate(model, ids, formats, args.window, args.max_tokens,
                                        progress=lambda _: bar.update(1))
    print(quant_eval.table(ppl, rows))
    print(json.dumps({"model": str(where), "tokens": min(len(ids), args.max_tokens) // args.window * args.window,
                      "float_ppl": ppl, "formats": [asdict(r) for r in rows]}))
    return 0


def _load(args: argparse.Namespace):
    return load_model_flags(args)


def _progress(total: int, desc: str, initial: int = 0):
    return tqdm(total=total, initial=initial, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)


def _model_info(model, args: argparse.Namespace) -> dict:
    return {"model": getattr(model, "source", str(args.model)), "dtype": str(model.dtype).removeprefix("torch."),
            "quantize": args.quantize or "none"}


# ---- the commands ------------------------------------------------------------------------------


def run_phonebook(args: argparse.Namespace) -> int:
    lengths = parse_lengths(args.lengths)
    _positive(args, "samples", "batch_size", "max_new_tokens")
    model, tokenizer = _load(args)
    retrieval.check_lengths(lengths, args.max_new_tokens, model.config.max_position_embeddings)
    samples = phonebook.make_samples(tokenizer, lengths, args.samples, args.seed)
    results, seconds = _run_retrieval(samples, model, tokenizer, args, phonebook.is_correct, "phonebook")
    rows = retrieval.summarize(samples, results, ("length",))
    print(f"phonebook retrieval, {args.samples} samples per length ({_describe(model, args)})")
    print(retrieval.format_table(rows, [("length", "length"), ("prompt_tokens", "prompt tokens"),
                                        ("samples", "samples"), ("correct", "correct"),
                                        ("accuracy", "accuracy")]))
    print(json.dumps({"eval": "phonebook", **_model_info(model, args), "seed": args.seed,
                      "samples": args.samples, "seconds": round(seconds, 1),
                      "accuracy": {str(r["length"]): r["accuracy"] for r in rows}, "results": rows}))
    return 0


def run_needle(args: argparse.Namespace) -> int:
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    _positive(args, "samples", "batch_size", "max_new_tokens")
    model, tokenizer = _load(args)
    retrieval.check_lengths(lengths, args.max_new_tokens, model.config.max_position_embeddings)
    samples = needle.make_samples(tokenizer, lengths, depths, args.samples, args.seed)
    results, seconds = _run_retrieval(samples, model, tokenizer, args, needle.is_correct, "needle")
    rows = retrieval.summarize(samples, results, ("length", "depth"))
    by_length = retrieval.summarize(samples, results, ("length",))
    print(f"needle retrieval, {args.samples} samples per length and depth ({_describe(model, args)})")
    print(retrieval.format_table(rows, [("length", "length"), ("depth", "depth"),
                                        ("prompt_tokens", "prompt tokens"), ("samples", "samples"),
                                        ("correct", "correct"), ("accuracy", "accuracy")]))
    print(retrieval.format_table(by_length, [("length", "length"), ("samples", "samples"),
                                             ("correct", "correct"), ("accuracy", "accuracy (all depths)")]))
    print(json.dumps({"eval": "needle", **_model_info(model, args), "seed": args.seed,
                      "samples": args.samples, "seconds": round(seconds, 1),
                      "accuracy": {str(r["length"]): r["accuracy"] for r in by_length},
                      "results": rows}))
    return 0


def _run_retrieval(samples, model, tokenizer, args, is_correct, name: str) -> tuple[list[bool], float]:
    generate = engine_generate(model, tokenizer, args.batch_size)
    start = time.perf_counter()
    with _progress(len(samples), name) as bar:
        results = retrieval.run(samples, generate, args.max_new_tokens, is_correct, progress=bar)
    return results, time.perf_counter() - start


def _describe(model, args: argparse.Namespace) -> str:
    info = _model_info(model, args)
    return f"{info['model']}, {info['dtype']}" + (f", {args.quantize}" if args.quantize else "")


def run_math(args: argparse.Namespace) -> int:
    _positive(args, "samples", "batch_size", "max_new_tokens")
    settings = math_eval.MathSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed)
    settings.params(0, 0)  # bad sampling flags fail before a slow load
    math_eval.math_verify()  # and so does a missing scorer, not hours later at the first answer
    problems = math_eval.load_problems(args.data)
    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}-results.jsonl")
    model, tokenizer = _load(args)

    def render(message: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)

    settings.max_new_tokens = _fit_budget(problems, tokenizer, render, model.config.max_position_embeddings,
                                          args.max_new_tokens)
    identity = {"eval": "math", **_model_info(model, args), "data_sha256": math_eval.file_digest(args.data),
                "problems": len(problems)}
    results = math_eval.ResultsFile(out, {**identity, **asdict(settings)})
    print(f"results: {out}", file=sys.stderr, flush=True)
    generate = engine_generate(model, tokenizer, args.batch_size)
    start = time.perf_counter()
    score = math_eval.run(problems, generate, settings, results, render=render,
                          progress=lambda total, done: _progress(total, "math", initial=done))
    seconds = time.perf_counter() - start
    print(f"math: {len(problems)} problems x {settings.samples} samples, temperature {settings.temperature}, "
          f"top_p {settings.top_p}, up to {settings.max_new_tokens} new tokens ({_describe(model, args)})")
    print(retrieval.format_table([{"problems": score["problems"], "samples": score["samples_per_problem"],
                                   "correct": score["correct"], "boxed": f"{100 * score['boxed_fraction']:.1f}%",
                                   "accuracy": score["pass@1"]}],
                                 [("problems", "problems"), ("samples", "samples/problem"),
                                  ("correct", "correct samples"), ("boxed", "with \\boxed{}"),
                                  ("accuracy", "Pass@1")]))
    print(json.dumps({**identity, "data": str(args.data), "out": str(out), **asdict(settings),
                      "seconds": round(seconds, 1), **score}))
    return 0


def _fit_budget(problems, tokenizer, render, context: int, asked: int) -> int:
    """max_new_tokens lowered (with a warning) to what the context leaves after the longest prompt."""
    longest = max(len(tokenizer.encode(render(math_eval.user_message(p)))) for p in problems)
    room = context - longest
    if room < 1:
        raise SambayError(f"the longest prompt is {longest} tokens, which fills the model's context of "
                          f"{context}; this model cannot answer these problems")
    if asked > room:
        print(f"sambay: warning: --max-new-tokens {asked} lowered to {room}: the model's context is "
              f"{context} tokens and the longest prompt takes {longest}", file=sys.stderr, flush=True)
        return room
    return asked
