r"""`sambay eval math`: Pass@1 of a reasoning model on math problems with boxed answers.

The protocol is the one the Phi-4-mini-flash-reasoning model card and SPEC.md section 7 report
(Math500 92.45, AIME24 52.29, AIME25 33.59): each problem is a user message through the model's
chat template, followed by "Please reason step by step, and put your final answer within
\boxed{}."; k samples per problem (64 for AIME, 8 for the others) at temperature 0.6, top_p 0.95,
up to 32K new tokens; the answer is the last \boxed{...} of the output; it is right when
math-verify finds it equal to the reference (so 1/2, 0.5 and \frac{1}{2} agree); Pass@1 is the
mean over problems of the fraction of right samples.

On the real checkpoint (one AIME problem with 32K tokens of reasoning takes hours on a CPU, which
is why every sample is saved the moment it finishes and a rerun picks up where the last one
stopped):

    sambay quantize --model microsoft/Phi-4-mini-flash-reasoning --out phi4-flash-int8
    sambay eval math --model phi4-flash-int8 --data aime24.jsonl --samples 64 \
        --out aime24-results.jsonl --batch-size 8

The data file is JSON lines with `problem` (or `question`) and `answer` (or `solution`, whose last
\boxed{} is then the answer). The results file starts with a settings line; rerunning with the same
--out skips what is done, and refuses if the settings (model, data, sampling, seed...) differ.
Sample j of problem i is sampled with its own seed derived from (--seed, i, j), so a rerun draws
the same samples whatever ran before it (up to float rounding that depends on the batch).

`run` takes a GenerateFn, so the tests drive it with a scripted model instead of a real one.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from sambay.errors import SambayError
from sambay.runtime.sampling import SamplingParams
from sambay.evals.generation import GenerateFn

INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."
DEFAULT_SAMPLES = 8  # the card's count for Math500 / GPQA; AIME uses 64
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 32768


@dataclass
class Problem:
    problem: str
    answer: str


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_problems(path: str | Path) -> list[Problem]:
    """Read a JSONL file of problems; a bad line is an error naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise SambayError(f"no data file at {path}; --data takes a JSONL file with one "
                          f'{{"problem": ..., "answer": ...}} object a line')
    problems = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                problems.append(_parse_problem(line, f"{path}:{number}"))
    if not problems:
        raise SambayError(f"{path} holds no problems; expected JSON lines with 'problem' and 'answer'")
    return problems


def _parse_problem(line: str, where: str) -> Problem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SambayError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise SambayError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("problem", obj.get("question"))
    if not isinstance(text, str) or not text.strip():
        raise SambayError(f"{where}: needs a non-empty 'problem' (or 'question') string")
    if obj.get("answer") is not None and str(obj["answer"]).strip():
        answer = str(obj["answer"]).strip()  # AIME files store integers
    elif isinstance(obj.get("solution"), str) and obj["solution"].strip():
        answer = extract_boxed(obj["solution"]) or obj["solution"].strip()
    else:
        raise SambayError(f"{where}: needs an 'answer' (or 'solution') field")
    return Problem(text, answer)


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def user_message(problem: Problem) -> str:
    return f"{problem.problem}\n{INSTRUCTION}"


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    r"""The contents of the last complete \boxed{...} (or \fbox{...}), nested braces included.

    A box that never closes (the output was cut off) does not count; None when there is no box.
    """
    best = None
    for command in (r"\boxed{", r"\fbox{"):
        start = text.rfind(command)
        while start >= 0:
            inner = _braced(text, start + len(command))
            if inner is not None:
                if best is None or start > best[0]:
                    best = (start, inner)
                break
            start = text.rfind(command, 0, start)
    return None if best is None else best[1].strip()


def _braced(text: str, i: int) -> str | None:
    """The text from i up to the brace that closes the one just before i, or None if none does."""
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def math_verify():
    """math-verify's (parse, verify), or an error saying how to install it."""
    try:  # imported here: only `eval math` scores with it, and a missing install gets this message
        from math_verify import parse, verify
    except ModuleNotFoundError:
        raise SambayError("sambay eval math needs the math-verify package: "
                          "pip install 'math-verify[antlr4_13_2]>=0.9'") from None
    return parse, verify


def is_equivalent(answer: str | None, reference: str) -> bool:
    """Whether two answers are the same mathematical object, by math-verify (False if unparsable)."""
    if not answer:
        return False
    parse, verify = math_verify()
    try:
        gold = parse(f"${reference.strip('$')}$")
        pred = parse(f"${answer.strip('$')}$")
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # math-verify raises on some malformed LaTeX; such an answer is simply wrong
        return False


# ---------------------------------------------------------------------------------------------
# The resumable loop
# ---------------------------------------------------------------------------------------------


@dataclass
class MathSettings:
    """What determines the samples. All of it goes into the results file's first line."""

    samples: int = DEFAULT_SAMPLES
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    instruction: str = INSTRUCTION

    def params(self, problem: int, sample: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k,
                              seed=sample_seed(self.seed, problem, sample)).validate()


def sample_seed(seed: int, problem: int, sample: int) -> int:
    """A 63-bit seed for one (problem, sample), independent of every other pair's."""
    digest = hashlib.sha256(f"{seed}:{problem}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ResultsFile:
    """A JSONL file: {"settings": {...}} first, then one record per finished (problem, sample).

    Records are appended and flushed one at a time, so a run killed at any moment loses at most
    the line being written; `load` drops such a torn last line.
    """

    def __init__(self, path: str | Path, settings: Mapping):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # as it reads back from the file

    def load(self) -> dict[tuple[int, int], dict]:
        """The records already in the file by (problem, sample); writes the header if it is new."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", encoding="utf-8") as f:
                f.write(json.dumps({"settings": self.settings}) + "\n")
            return {}
        raw = self.path.read_bytes()
        lines = raw.decode("utf-8").split("\n")
        if not raw.endswith(b"\n"):  # killed mid-write: forget the partial record
            torn = lines.pop()
            self.path.write_bytes(raw[:len(raw) - len(torn.encode("utf-8"))])
        lines = [x for x in lines if x.strip()]
        self._check_header(lines[0] if lines else "")
        records = {}
        for number, line in enumerate(lines[1:], 2):
            try:
                rec = json.loads(line)
                key = (int(rec["problem"]), int(rec["sample"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise SambayError(f"{self.path}:{number} is not a results record; is this file from "
                                  f"'sambay eval math'? Pass another --out") from None
            records.setdefault(key, rec)
        return records

    def _check_header(self, line: str) -> None:
        try:
            found = json.loads(line)["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SambayError(f"{self.path} does not start with a settings line; it is not a "
                              f"'sambay eval math' results file. Pass another --out") from None
        diffs = [f"{k}: {found.get(k)!r} there, {v!r} here" for k, v in self.settings.items()
                 if found.get(k) != v]
        diffs += [f"{k}: {v!r} there, unset here" for k, v in found.items() if k not in self.settings]
        if diffs:
            raise SambayError(f"{self.path} was made with different settings ({'; '.join(diffs)}); "
                              f"rerun with the same flags to resume, or pass another --out")

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()


def run(problems: Sequence[Problem], generate: GenerateFn, settings: MathSettings,
        results: ResultsFile | None = None, render: Callable[[str], str] = lambda message: message,
        progress: Callable[[int, int], Any] | None = None) -> dict:
    """Sample every (problem, sample) not yet in `results`, score it, save it; return the score.

    render turns the user message into the prompt text (the CLI applies the chat template).
    progress(total, already_done) makes a tqdm-like bar (told what was done before, so that its
    rate and time left count this run's samples only).
    """
    done = results.load() if results is not None else {}
    todo = [(i, j) for i in range(len(problems)) for j in range(settings.samples) if (i, j) not in done]
    prompts = [render(user_message(problems[i])) for i in range(len(problems))]
    records = dict(done)
    with progress(len(problems) * settings.samples, len(done)) if progress else nullcontext() as bar:
        for k, text in generate([prompts[i] for i, _ in todo], [settings.params(i, j) for i, j in todo]):
            i, j = todo[k]
            records[(i, j)] = rec = _record(problems[i], i, j, settings.seed, text)
            if results is not None:
                results.append(rec)
            if bar is not None:
                bar.update(1)
    return score(records, len(problems), settings.samples)


def _record(problem: Problem, i: int, j: int, seed: int, text: str) -> dict:
    """One results line: the sample's output, its extracted answer and whether it is right."""
    extracted = extract_boxed(text)
    return {"problem": i, "sample": j, "seed": sample_seed(seed, i, j), "answer": problem.answer,
            "extracted": extracted, "correct": is_equivalent(extracted, problem.answer), "output": text}


def score(records: Mapping[tuple[int, int], dict], problems: int, samples: int) -> dict:
    """Pass@1 (mean over problems of each one's fraction of right samples) and counts."""
    missing = problems * samples - sum(1 for i, j in records if i < problems and j < samples)
    if missing:
        raise RuntimeError(f"{missing} samples were not generated")  # a bug, not a user error
    per_problem = [sum(bool(records[(i, j)]["correct"]) for j in range(samples)) / samples
                   for i in range(problems)]
    boxed = sum(records[(i, j)]["extracted"] is not None for i in range(problems) for j in range(samples))
    return {"pass@1": sum(per_problem) / problems, "problems": problems, "samples_per_problem": samples,
            "correct": sum(bool(records[(i, j)]["correct"]) for i in range(problems) for j in range(samples)),
            "boxed_fraction": boxed / (problems * samples), "per_problem": per_problem}
