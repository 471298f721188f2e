"""`sambay bench generation` and `sambay bench memory`: is the paper's efficiency
claim true on this machine? SambaY and the Transformer it replaces, side by side, in one run.

The release claims up to 10x decoding throughput over Phi-4-mini-reasoning (2K-token prompt, 32K
generated tokens, equal GPU memory), 2-3x lower latency, latency growing near-linearly where the
Transformer's grows quadratically, and a decode state ~25x smaller per token (SPEC.md sections 6-7).
Those follow from two facts a CPU can measure too: each decode step of a Transformer reads K/V of
every earlier position in every layer (so step time grows with length), and its K/V fill memory
(so fewer requests fit next to the weights). Hence, per model:

  * batch 1: the latency of one request producing G tokens (prefill + decode), read off ONE long
    generation as the cumulative time at each G;
  * the largest batch whose decode state for prompt + longest G fits in --memory-budget next to
    the weights: aggregate tokens/s and per-request latency at each G;
  * (bench memory) prefill seconds and decode-state bytes vs context length.

Generation is real: random prompt tokens through the model with its preallocated decode state,
greedy, never stopping early. A quadratic fit says how much of the time at the longest length is
the quadratic term. Results: a table, PNG figures (written atomically) and one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from sambay.bench.common import load, table
from sambay.bench.prefill import time_prefill
from sambay.errors import SambayError
from sambay.files import atomic_path

# The released layouts at a quarter of the width (same layer and head counts, same 25.6x ratio of
# state bytes per token): the same comparison at a size a CPU measures in one sitting.
DEFAULT_MODELS = "phi4-mini-flash-scaled,phi4-mini-scaled"
PAPER = {"throughput_ratio": 10.0, "latency_ratio": [2.0, 3.0], "prompt": 2048, "generated": 32768}
PREFILL_TOKENS_PER_CALL = 2048  # batched prefill: rows x chunk tokens per forward call
CURVE_POINTS = 64  # latency-curve samples kept in the JSON and the figure


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def load_models(names: Sequence[str], dtype: str, quantize: str | None, random_weights: bool = False,
                seed: int = 0) -> list[tuple[str, torch.nn.Module]]:
    """(name, model) for each name; a name that is no preset is a folder or repo id."""
    return [(name, load(name, dtype, quantize, random_weights, seed)) for name in names]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage once (a tied head shares the embedding)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def state_row_bytes(model, context: int) -> int:
    """Measured bytes of a real decode state for one row holding `context` tokens."""
    return model.new_state(1, context).nbytes()


def state_formula_bytes(model, context: int, kv_bytes: int) -> int:
    """What the config says the same state should take (fixed part + growing K/V)."""
    cfg = model.config
    return cfg.state_bytes_fixed(1, kv_bytes) + context * cfg.state_bytes_per_token(kv_bytes)


def budget_batch(name: str, weights: int, row: int, budget: int) -> int:
    """The most rows whose decode state fits in `budget` next to the weights."""
    batch = (budget - weights) // row
    if batch < 1:
        raise SambayError(f"--memory-budget {mib(budget)} is too small for {name}: its weights take "
                          f"{mib(weights)} and one row of decode state {mib(row)}, so it needs at "
                          f"least {mib(weights + row)}; raise --memory-budget or shorten --lengths")
    return int(batch)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def timed_generation(model, prompt: int, tokens: int, batch: int, seed: int = 0,
                     desc: str = "") -> tuple[float, list[float]]:
    """Generate `tokens` greedy tokens for `batch` rows after a random `prompt`-token prompt, never
    stopping early. Returns (prefill seconds, cumulative seconds from the start until token g was
    produced, for g = 1..tokens). Token 1 comes from the prefill's logits, token g from decode call
    g-1, so `tokens` tokens cost one prefill and tokens-1 decode calls."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g)  # (B, P)
    chunk = max(1, PREFILL_TOKENS_PER_CALL // batch)
    warm = model.new_state(batch, 18)  # untimed: first calls pay for allocations and kernel setup
    model(ids[:, :16], state=warm)
    model(ids[:, :1], state=warm)
    del warm
    state = model.new_state(batch, prompt + tokens)
    times = []
    bar = tqdm(total=tokens, desc=desc, unit="tok", file=sys.stderr, mininterval=2, leave=False)
    start = time.perf_counter()
    for c0 in range(0, prompt, chunk):
        logits = model(ids[:, c0:c0 + chunk], state=state, logits_to_keep=1)  # (B, 1, V)
    prefill = time.perf_counter() - start
    for step in range(tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        times.append(time.perf_counter() - start)
        bar.update()
        if step + 1 < tokens:  # the last token is never fed back
            logits = model(nxt, state=state, logits_to_keep=1)
    bar.close()
    return prefill, times


def quadratic_share(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares fit y = a + b x + c x^2; the share c x^2 / y at the largest x (how much of the
    cost there the quadratic term explains). None with fewer than 3 points."""
    if len(xs) < 3:
        return None
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    scale = float(x.max())  # fit in x/scale: well conditioned
    A = torch.stack([torch.ones_like(x), x / scale, (x / scale) ** 2], dim=1)  # (N, 3)
    a, b, c = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1).tolist()
    return round(c / (a + b + c), 3) if a + b + c else None


def _curve(times: list[float]) -> list[tuple[int, float]]:
    """About CURVE_POINTS (G, seconds) samples of a cumulative-time list, always ending at its end."""
    n = len(times)
    gs = sorted({max(1, round(n * i / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)})
    return [(g, round(times[g - 1], 4)) for g in gs]


def measure_model(name: str, model, prompt: int, lengths: list[int], batch: int, seed: int) -> dict:
    """One long generation to max(lengths) at `batch` rows; figures at each G in `lengths`."""
    prefill, times = timed_generation(model, prompt, lengths[-1], batch, seed, f"{name} batch {batch}")
    rows = [{"tokens": G, "latency_s": round(times[G - 1], 5),
             "tokens_per_s": round(batch * G / times[G - 1], 2)} for G in lengths]
    curve = _curve(times)
    return {"batch": batch, "prefill_s": round(prefill, 3), "results": rows, "curve": curve,
            "quadratic_share": quadratic_share([g for g, _ in curve], [t for _, t in curve])}


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _figure(**kw):
    """A matplotlib Figure of its own, never pyplot's: no global backend or figure list is touched."""
    try:  # imported here: matplotlib is the optional `plot` extra, needed only by these two benchmarks
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise SambayError("the figures need matplotlib: pip install 'sambay[plot]' (or matplotlib "
                          "itself) into this environment") from None
    return Figure(**kw)


def save_png(fig, path: Path) -> str:
    """Write the figure to `path` atomically: a reader never sees half a PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return str(path)


def plot_latency(results: dict, prompt: int, out: Path) -> str:
    """Figure 1 of the release blog, in shape: batch-1 latency vs generation length."""
    fig = _figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, r in results.items():
        g, t = zip(*r["batch1"]["curve"])
        ax.plot(g, t, label=name, lw=2)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("latency per request (s)")
    ax.set_title(f"Latency vs generation length (batch 1, {prompt}-token prompt)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, out / "generation-latency.png")


def plot_throughput(results: dict, budget: int, out: Path) -> str:
    """Throughput vs latency: one point per batch and generation length, a line per model/batch."""
    fig = _figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for i, (name, r) in enumerate(results.items()):
        for run, marker in (("batch1", "o"), ("budget", "s")):
            rows = r[run]["results"]
            ax.plot([x["latency_s"] for x in rows], [x["tokens_per_s"] for x in rows], marker=marker,
                    color=f"C{i}", ls="-" if run == "budget" else ":",
                    label=f"{name}, batch {r[run]['batch']}")
            for x in rows:
                ax.annotate(str(x["tokens"]), (x["latency_s"], x["tokens_per_s"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # optional, as in _figure

    ax.set_xscale("log")  # batch 1 and the budget's batch lie orders of magnitude apart
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # ticks at 1, 2, 5 x 10^k, written 20, not 2x10^1
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency per request (s)")
    ax.set_ylabel("throughput (generated tokens/s, all rows)")
    ax.set_title(f"Throughput vs latency ({mib(budget)} budget; labels: tokens generated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out / "generation-throughput.png")


def plot_prefill_memory(results: dict, out: Path) -> str:
    fig = _figure(figsize=(10, 4))
    a1, a2 = fig.subplots(1, 2)
    for name, r in results.items():
        n = [x["tokens"] for x in r["results"]]
        a1.plot(n, [x["seconds"] for x in r["results"]], marker="o", label=name)
        a2.plot(n, [x["state_bytes"] / 2**20 for x in r["results"]], marker="o", label=name)
    a1.set(xlabel="prompt tokens", ylabel="prefill (s)", title="Prefill time vs prompt length")
    a2.set(xlabel="context tokens", ylabel="decode state, batch 1 (MiB)",
           title="Decode state vs context length")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(fig, out / "prefill-memory.png")


# ---------------------------------------------------------------------------------------------
# bench generation
# ---------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    """num / den to 3 significant digits."""
    return float(f"{num / den:.3g}") if den else None


def _sorted_lengths(lengths: Sequence[int]) -> list[int]:
    values = sorted(set(lengths))
    if not values or values[0] < 1:
        raise SambayError(f"--lengths must be token counts of at least 1, got {list(lengths)}")
    return values


def _check_context(name: str, model, need: int, what: str) -> None:
    limit = model.config.max_position_embeddings
    if need > limit:
        raise SambayError(f"{what} = {need} tokens exceeds {name}'s context of {limit} tokens; "
                          f"lower --lengths or --prompt")


def bench_generation(models: Sequence[str], *, memory_budget: int, prompt: int = 512,
                     lengths: Sequence[int] = (256, 512, 1024, 2048), dtype: str = "float32",
                     quantize: str | None = None, random_weights: bool = False, seed: int = 0,
                     out: str | Path = "bench-results") -> dict:
    """SambaY (models[0]) against its baseline (models[1]): print the table, write the two figures
    into `out`, print the JSON line and return the JSON object. Everything that can be checked is
    checked before the long part starts."""
    started = time.perf_counter()
    lengths = _sorted_lengths(lengths)
    if prompt < 1:
        raise SambayError(f"--prompt must be at least 1 token, got {prompt}")
    if len(models) != 2:
        raise SambayError(f"--models takes exactly two models, SambaY first and then its baseline "
                          f"(such as {DEFAULT_MODELS}); got {','.join(models)!r}")
    _figure()  # no matplotlib: fail now, not after the long measurements
    context = prompt + lengths[-1]
    loaded = load_models(models, dtype, quantize, random_weights, seed)
    plan = {}
    for name, model in loaded:
        _check_context(name, model, context, f"--prompt {prompt} + longest --lengths {lengths[-1]}")
        weights, row = weight_bytes(model), state_row_bytes(model, context)
        plan[name] = {"weights_bytes": weights, "state_bytes_per_row": row,
                      "budget_batch": budget_batch(name, weights, row, memory_budget)}
    results = {}
    for name, model in loaded:
        r = results[name] = dict(plan[name])
        r["batch1"] = measure_model(name, model, prompt, lengths, 1, seed)
        B = r["budget_batch"]
        r["budget"] = r["batch1"] if B == 1 else measure_model(name, model, prompt, lengths, B, seed)
    summary = compare(results)
    out = Path(out)
    figures = [plot_latency(results, prompt, out), plot_throughput(results, memory_budget, out)]
    print(generation_table(results, prompt, lengths[-1], memory_budget, summary))
    result = {
        "bench": "generation", "models": list(results), "prompt": prompt, "lengths": lengths,
        "memory_budget_bytes": memory_budget, "dtype": dtype, "quantize": quantize or "none",
        "threads": torch.get_num_threads(), "seed": seed, "results": results, **summary,
        "paper": PAPER, "figures": figures, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))
    return result


def compare(results: dict) -> dict:
    """The paper's figures of merit, SambaY (first) against its baseline (second), at the longest G:
    throughput at the budget's batches, and latency at batch 1 (also at every G)."""
    (a, b) = results.values()
    return {
        "throughput_ratio": _ratio(a["budget"]["results"][-1]["tokens_per_s"],
                                   b["budget"]["results"][-1]["tokens_per_s"]),
        "latency_ratio": _ratio(b["batch1"]["results"][-1]["latency_s"],
                                a["batch1"]["results"][-1]["latency_s"]),
        "latency_ratios": {x["tokens"]: _ratio(y["latency_s"], x["latency_s"])
                           for x, y in zip(a["batch1"]["results"], b["batch1"]["results"])},
        "state_ratio": _ratio(b["state_bytes_per_row"], a["state_bytes_per_row"]),
    }


def generation_table(results: dict, prompt: int, G: int, budget: int, summary: dict) -> str:
    (a, ra), (b, rb) = results.items()
    w = max(len(a), len(b), 5)
    lines = [f"{'model':<{w}}  {'weights':>12}  {'state/row':>12}  {'rows in ' + mib(budget):>18}"]
    for name, r in results.items():
        lines.append(f"{name:<{w}}  {mib(r['weights_bytes']):>12}  {mib(r['state_bytes_per_row']):>12}  "
                     f"{r['budget_batch']:>18}")
    lines.append(f"(state/row: decode state of one request at {prompt} prompt + {G} generated tokens)")
    for run, title in (("batch1", "batch 1"), ("budget", "largest batch in the budget")):
        lines += ["", f"{title}: latency per request (s) and tokens/s over all rows, prompt {prompt}",
                  f"{'G':>7}  {a + ' b' + str(ra[run]['batch']):>{w + 8}}  "
                  f"{b + ' b' + str(rb[run]['batch']):>{w + 8}}  {'tok/s ratio':>11}  {'latency ratio':>13}"]
        for x, y in zip(ra[run]["results"], rb[run]["results"]):
            lines.append(f"{x['tokens']:>7}  {x['latency_s']:>{w - 4}.2f} s {x['tokens_per_s']:>8.1f}/s  "
                         f"{y['latency_s']:>{w - 4}.2f} s {y['tokens_per_s']:>8.1f}/s  "
                         f"{_ratio(x['tokens_per_s'], y['tokens_per_s']):>10}x  "
                         f"{_ratio(y['latency_s'], x['latency_s']):>12}x")
    qa, qb = ra["batch1"]["quadratic_share"], rb["batch1"]["quadratic_share"]
    lines += ["", table([
        (f"throughput {a} / {b}", f"{summary['throughput_ratio']}x at G={G}, equal {mib(budget)} budget "
                                  f"(paper: up to {PAPER['throughput_ratio']:.0f}x at 32K)"),
        (f"latency {b} / {a}", f"{summary['latency_ratio']}x at G={G}, batch 1 (paper: 2-3x lower)"),
        ("quadratic share of latency", f"{a} {_pct(qa)}, {b} {_pct(qb)} at G={G}, batch 1 "
                                       f"(paper: near-linear vs quadratic)"),
        (f"state per row {b} / {a}", f"{summary['state_ratio']}x at {prompt + G} tokens "
                                     f"(paper: ~25x per token)"),
    ])]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


# ---------------------------------------------------------------------------------------------
# bench memory: prefill time and decode-state memory vs context length
# ---------------------------------------------------------------------------------------------


def bench_memory(models: Sequence[str], *, lengths: Sequence[int] = (256, 512, 1024, 2048, 4096),
                 chunk: int = 512, dtype: str = "float32", quantize: str | None = None,
                 random_weights: bool = False, seed: int = 0, out: str | Path = "bench-results") -> dict:
    """For each model and length: print prefill seconds and the decode state's bytes (measured and
    from the config), write the figure into `out`, print the JSON line and return the JSON object."""
    lengths = _sorted_lengths(lengths)
    _figure()
    loaded = load_models(models, dtype, quantize, random_weights, seed)
    kv_bytes = torch.finfo(getattr(torch, dtype)).bits // 8
    for name, model in loaded:
        _check_context(name, model, lengths[-1], "the longest of --lengths")
    results = {}
    for name, model in loaded:
        rows = []
        for n in lengths:
            sec, state = time_prefill(model, n, chunk, seed=seed)
            rows.append({"tokens": n, "seconds": round(sec, 3), "tokens_per_s": round(n / sec, 1),
                         "state_bytes": state.nbytes(), "state_formula_bytes":
                         state_formula_bytes(model, n, kv_bytes)})
            del state
            print(f"{name}: prefill {n} tokens {sec:.2f} s, state {mib(rows[-1]['state_bytes'])}",
                  file=sys.stderr, flush=True)
        results[name] = {"results": rows, "quadratic_share": quadratic_share(
            [r["tokens"] for r in rows], [r["seconds"] for r in rows])}
    figure = plot_prefill_memory(results, Path(out))
    print(prefill_table(results))
    result = {"bench": "memory", "models": list(results), "dtype": dtype, "quantize": quantize or "none",
              "chunk": chunk, "threads": torch.get_num_threads(), "results": results, "figures": [figure]}
    print(json.dumps(result))
    return result


def prefill_table(results: dict) -> str:
    w = max(max(len(n) for n in results), 5)
    lines = [f"{'model':<{w}}  {'tokens':>7}  {'prefill s':>9}  {'tok/s':>8}  {'state (measured)':>17}  "
             f"{'state (config)':>15}"]
    for name, r in results.items():
        for x in r["results"]:
            lines.append(f"{name:<{w}}  {x['tokens']:>7}  {x['seconds']:>9.2f}  {x['tokens_per_s']:>8.1f}  "
                         f"{mib(x['state_bytes']):>17}  {mib(x['state_formula_bytes']):>15}")
    lines.append("quadratic share of prefill time at the longest length: "
                 + ", ".join(f"{n} {_pct(r['quadratic_share'])}" for n, r in results.items()))
    return "\n".join(lines)
