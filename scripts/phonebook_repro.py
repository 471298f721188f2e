#!/usr/bin/env python3
"""A small-scale reproduction of the paper's Phonebook table: SambaY vs a Transformer++.

The paper trains 1B-scale models at a 32K context and reads phone numbers back at 32K and 64K
(SPEC.md section 7). This does the same at laptop scale, with the project's own commands only:

    1. write phonebook training documents (the eval's format from a training seed: a book, two
       example lookups, the query with its answer, then six more lookups), one JSON line each;
    2. `sambay prepare` them with a BPE tokenizer trained on them;
    3. `sambay train` the `small` SambaY and the `small-phi3` Transformer++ (full RoPE), both at
       half width (hidden 128, 4 heads: 2.4M parameters each, equal to 0.5%) so that they train in
       minutes, on the same tokens with the same settings and budget, at the training context C
       (both at once, one thread each, unless --sequential);
    4. `sambay eval phonebook` both at C, 2C and 4C (greedy, exact match, the same seeded books);
    5. print a Markdown table and one JSON line, and write both to OUT/results.md / results.json.

    .venv/bin/python scripts/phonebook_repro.py --out runs/phonebook     # C = 256, 600 steps x 16
    .venv/bin/python scripts/phonebook_repro.py --context 128 --steps 1000 --samples 100

Every step is skipped when its output exists (a finished `sambay train` run re-exports only), so
an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sambay.evals.phonebook import format_prompt, positions, random_entries  # noqa: E402

# label -> (preset, config overrides). Half the presets' width; the Transformer's MLP is a little
# wider so both have the same number of parameters.
HALF_WIDTH = ["hidden_size=128", "num_attention_heads=4", "num_key_value_heads=2"]
MODELS = {"SambaY": ("small", HALF_WIDTH + ["intermediate_size=512"]),
          "Transformer++": ("small-phi3", HALF_WIDTH + ["intermediate_size=576"])}


LOOKUPS = 6  # lookups after each book's query: about half of a document's tokens are retrievals


def training_documents(n: int, context: int, seed: int) -> list[str]:
    """Phonebooks of random size up to about `context` tokens, each followed by lookups.

    A document is the eval's prompt (book, two example lookups, a query) with its answer, then
    more lookups of names from the book: every lookup line is a retrieval the model can learn.
    The eval draws its books from another seed string, so no test book is ever trained on.
    """
    rng = random.Random(f"phonebook-train:{seed}")
    docs = []
    for _ in range(n):
        size = rng.randint(3, max(4, context // 14))  # ~8-10 tokens per entry with a 2K vocabulary
        entries = random_entries(rng, size)
        a, b, q = positions([rng.random() for _ in range(3)], size)
        lookups = [entries[i] for i in (rng.randrange(size) for _ in range(LOOKUPS))]
        text = format_prompt(entries, a, b, q) + f" {entries[q][1]}\n"
        text += "".join(f"{name}: {number}\n" for name, number in lookups)
        docs.append(text)
    return docs


def run(cmd: list[str], log: Path | None = None) -> str:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if log is not None:
        log.write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"phonebook_repro: step failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/phonebook", help="working folder (default runs/phonebook)")
    p.add_argument("--context", type=int, default=256, help="training context C (default 256)")
    p.add_argument("--documents", type=int, default=20000, help="training documents (default 20000)")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the data (default 2048)")
    p.add_argument("--steps", type=int, default=600, help="training steps per model (default 600)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=50, help="phonebooks per eval length (default 50)")
    p.add_argument("--threads", type=int, default=1, help="threads per training process (default 1)")
    p.add_argument("--sequential", action="store_true",
                   help="train the models one after the other (default: both at once, one process each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sambay = [sys.executable, "-m", "sambay", "--threads", str(args.threads)]
    start = time.time()

    corpus = out / "train.jsonl"
    if not corpus.exists():
        tmp = corpus.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for doc in training_documents(args.documents, args.context, args.seed):
                f.write(json.dumps({"text": doc}) + "\n")
        tmp.replace(corpus)
    data = out / "data"
    if not (data / "manifest.json").exists():
        run(sambay + ["prepare", str(corpus), "--train-tokenizer", str(args.vocab), "--out", str(data)])

    lengths = [args.context, 2 * args.context, 4 * args.context]
    training = []
    for label, (preset, overrides) in MODELS.items():
        run_dir = out / preset
        # The same budget for both: steps x batch x context tokens, same schedule and seed. The
        # vocabulary is the data's, so both presets shrink their embedding the same way.
        flags = [x for o in overrides + [f"vocab_size={args.vocab}"] for x in ("--override", o)]
        cmd = sambay + ["train", "--preset", preset, *flags, "--data", str(data), "--out", str(run_dir),
                        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                        "--seq-len", str(args.context), "--lr", str(args.lr), "--min-lr", str(args.lr / 20),
                        "--warmup", str(min(20, args.steps // 4)), "--eval-every", str(max(1, args.steps // 6)),
                        "--eval-batches", "5", "--seed", str(args.seed), "--quiet"]
        cmd += ["--resume"] if (run_dir / "run.json").exists() else []
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        training.append((cmd, subprocess.Popen(cmd, cwd=ROOT)))
        if args.sequential:
            training[-1][1].wait()
    for cmd, proc in training:
        if proc.wait() != 0:
            sys.exit(f"phonebook_repro: training failed ({proc.returncode}): {' '.join(cmd)}")

    results: dict[str, dict] = {}
    for label, (preset, _) in MODELS.items():
        run_dir = out / preset
        stdout = run(sambay + ["eval", "phonebook", "--model", str(run_dir / "model"),
                               "--lengths", ",".join(map(str, lengths)), "--samples", str(args.samples),
                               "--batch-size", "8", "--seed", str(args.seed)], log=out / f"eval-{preset}.txt")
        report = json.loads(stdout.strip().splitlines()[-1])
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m["val_loss"] for m in metrics if "val_loss" in m]
        params = json.loads(run((sambay + ["info", "--model", str(run_dir / "model"), "--json"])))["parameters"]
        results[label] = {"preset": preset, "parameters": params, "final_val_loss": val[-1],
                          "accuracy": report["accuracy"]}

    header = "| model | parameters | val loss | " + " | ".join(
        f"{n // args.context}x = {n} tokens" for n in lengths) + " |"
    rows = [header, "|" + "---|" * (3 + len(lengths))]
    for label, r in results.items():
        accs = " | ".join(f"{100 * r['accuracy'][str(n)]:.0f}%" for n in lengths)
        rows.append(f"| {label} (`{r['preset']}`, half width) | {r['parameters'] / 1e6:.2f}M | "
                    f"{r['final_val_loss']:.3f} | {accs} |")
    table = "\n".join(rows)
    summary = {"context": args.context, "lengths": lengths, "steps": args.steps,
               "batch_size": args.batch_size, "training_tokens": args.steps * args.batch_size * args.context,
               "samples": args.samples, "minutes": round((time.time() - start) / 60, 1), "models": results}
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
