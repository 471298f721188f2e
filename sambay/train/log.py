"""What `sambay train` reports as it runs: the metrics log, the loss plot and the progress line.

* `Metrics` appends one JSON object per line to OUT/metrics.jsonl (training steps and validation
  passes; on resume the lines past the checkpoint are dropped) and redraws OUT/loss.png from them
  (needs matplotlib: `pip install 'sambay[plot]'`; without it only the note is printed, once).
* `Progress` keeps one live line on stderr (step, loss, lr, tokens/s, ETA) and prints messages
  without mangling it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sambay.files import atomic_path, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Metrics:
    """OUT/metrics.jsonl (one JSON object per line) and the loss plot, written by rank 0 only.

    On resume, lines past the checkpoint's step are dropped: those steps are run again.
    """

    def __init__(self, out: Path, keep_until: int | None, enabled: bool):
        self.path, self.plot_path, self.enabled = out / METRICS_FILE, out / PLOT_FILE, enabled
        self.records: list[dict[str, Any]] = []
        self.file = None
        self.warned = False
        if not enabled:
            return
        if keep_until is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(rec, dict) and rec.get("step", math.inf) <= keep_until:
                    self.records.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, **record: Any) -> None:
        if self.file is None:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def plot(self) -> bool:
        """Redraw loss.png (train loss per step and its moving average, validation loss)."""
        if not self.enabled:
            return False
        try:  # optional dependency: pip install 'sambay[plot]'
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if not self.warned:
                print("sambay train: note: matplotlib is not installed, so no loss.png "
                      "(pip install 'sambay[plot]'); metrics.jsonl has every number", file=sys.stderr)
                self.warned = True
            return False
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if train:
            steps, losses = zip(*train)
            k = len(losses) // 50  # smooth long runs with a moving mean of k steps
            ax.plot(steps, losses, lw=0.8 if k > 1 else 1.4, alpha=0.35 if k > 1 else 1.0,
                    color="tab:blue", label="train")
            if k > 1:
                avg = [sum(losses[max(0, i - k + 1):i + 1]) / min(k, i + 1) for i in range(len(losses))]
                ax.plot(steps, avg, lw=1.6, color="tab:blue", label=f"train (mean of {k} steps)")
        if val:
            ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title("sambay train: loss")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        fig.tight_layout()
        with atomic_path(self.plot_path) as tmp:
            fig.savefig(tmp, format="png")
        return True


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One live line on stderr (carriage return on a terminal, a plain line now and then otherwise)."""

    def __init__(self, total: int, enabled: bool, live: bool = True, stream=None):
        self.total, self.enabled, self.show_steps = total, enabled, live
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, total // 20)
        self.live = 0

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, eta: float) -> None:
        if not (self.enabled and self.show_steps):
            return
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self.live))
            self.live = len(line)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + " " * self.live + "\r")
            self.live = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
            self.live = 0
