"""`sambay eval`: prompt formats, answer extraction and equivalence, Pass@1 and resume with a
scripted model, and the three commands end to end on the embedded default model."""

import contextlib
import json
import re
import types

import pytest

import sambay
from sambay.cli import main
from sambay.cli.eval import _fit_budget, parse_depths, parse_lengths
from sambay.errors import SambayError
from sambay.evals import math_eval, needle, phonebook, retrieval
from sambay.evals.generation import engine_generate, first_line
from sambay.runtime.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY = re.compile(r"^[A-Z][a-z]+ [A-Z][A-Za-z]+: [6-9][0-9]{9}$")


@pytest.fixture(scope="module")
def tok():
    return sambay.load_tokenizer()  # the embedded default model's 4,096-token BPE


@pytest.fixture(scope="module")
def model():
    return sambay.load_model()


# ---- scripted models -------------------------------------------------------------------------------


def scripted(answer):
    """A GenerateFn whose reply to each prompt is answer(prompt, params); records every prompt."""
    def generate(prompts, params):
        generate.calls.extend(prompts)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            yield i, answer(prompt, p)

    generate.calls = []
    return generate


def phonebook_lookup(prompt, _params):
    """What a perfect model says: the number of the queried name, then more text."""
    name = prompt.rsplit("\n", 1)[1].removesuffix(":")
    number = re.search(rf"^{re.escape(name)}: (\d+)$", prompt, re.M).group(1)
    return f" {number}\nSomeone Else: 6000000000"


# ---- phonebook ---------------------------------------------------------------------------------------


def test_phonebook_prompt_is_exactly_the_spec_format():
    entries = [("Ann Lee", "6123456789"), ("Bob Cox", "9876543210"), ("Cy Hall", "7000000001")]
    assert phonebook.format_prompt(entries, 2, 0, 1) == (
        "Ann Lee: 6123456789\nBob Cox: 9876543210\nCy Hall: 7000000001"
        "\n\nCy Hall: 7000000001\nAnn Lee: 6123456789\n\nBob Cox:")


def test_phonebook_sample_rules_and_token_budget(tok):
    for length in (256, 1024):
        s = phonebook.make_sample(tok, length, seed=3, index=1)
        book, examples, query = s.prompt.split("\n\n")
        lines = book.split("\n")
        assert len(lines) == s.items >= 3
        assert all(ENTRY.match(line) for line in lines)
        names = [line.split(":")[0] for line in lines]
        assert len(set(names)) == len(names)  # lookups are well defined
        assert len({line.split(": ")[1] for line in lines}) == len(lines)
        first, second = examples.split("\n")
        assert first in lines and second in lines and first != second
        assert query.endswith(":") and f"{query} {s.answer}" in lines and f"{query} {s.answer}" not in examples
        assert len(tok.encode(s.prompt)) == s.prompt_tokens <= length
        assert s.prompt_tokens > length - 30  # filled: one more entry would not fit


def test_phonebook_is_reproducible_per_seed(tok):
    a = phonebook.make_samples(tok, [256], samples=2, seed=7)
    b = phonebook.make_samples(tok, [256], samples=2, seed=7)
    c = phonebook.make_samples(tok, [256], samples=2, seed=8)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert a[0].prompt != a[1].prompt and a[0].prompt != c[0].prompt


def test_phonebook_scoring_takes_the_first_line_exactly():
    assert phonebook.is_correct(" 6123456789\nAnn Lee: 1", "6123456789")
    assert phonebook.is_correct("6123456789  ", "6123456789")
    assert not phonebook.is_correct(" 61234567890", "6123456789")
    assert not phonebook.is_correct("\n6123456789", "6123456789")
    assert not phonebook.is_correct(" 6123456789 is it", "6123456789")


def test_a_perfect_scripted_model_scores_100_and_a_wrong_one_0(tok):
    samples = phonebook.make_samples(tok, [256, 512], samples=3, seed=0)
    right = retrieval.run(samples, scripted(phonebook_lookup), 16, phonebook.is_correct)
    wrong = retrieval.run(samples, scripted(lambda p, _: " 6000000000"), 16, phonebook.is_correct)
    assert [r["accuracy"] for r in retrieval.summarize(samples, right, ["length"])] == [1.0, 1.0]
    assert [r["accuracy"] for r in retrieval.summarize(samples, wrong, ["length"])] == [0.0, 0.0]


# ---- needle ------------------------------------------------------------------------------------------


def test_needle_depth_budget_and_scoring(tok):
    start = needle.make_sample(tok, 400, depth=0.0, seed=0, index=0)
    end = needle.make_sample(tok, 400, depth=1.0, seed=0, index=0)
    for s in (start, end):
        assert re.fullmatch(r"\d{7}", s.answer)
        assert len(tok.encode(s.prompt)) == s.prompt_tokens <= 400 and s.prompt_tokens > 400 - 30
        assert s.prompt.startswith(needle.INTRO + "\n") and s.prompt.endswith("mentioned in the provided text is")
    needle_text = f"is: {start.answer}."
    assert start.prompt.split("\n")[1].startswith("The special magic number for") and needle_text in start.prompt
    assert end.prompt.split("\n")[1].endswith(f"is: {end.answer}.")
    assert needle.is_correct(f" {start.answer}.\n", start.answer)
    assert not needle.is_correct(f"\n{start.answer}", start.answer)
    samples = needle.make_samples(tok, [256], [0, 0.5, 1], samples=2, seed=1)
    answer = scripted(lambda p, _: " " + re.search(r"is: (\d{7})\.", p).group(1))
    rows = retrieval.summarize(samples, retrieval.run(samples, answer, 16, needle.is_correct), ["length", "depth"])
    assert [(r["depth"], r["accuracy"], r["samples"]) for r in rows] == [(0, 1.0, 2), (0.5, 1.0, 2), (1, 1.0, 2)]


def test_lengths_beyond_the_context_are_refused():
    with pytest.raises(SambayError, match="beyond the model's context of 4096"):
        retrieval.check_lengths([512, 4096], max_new_tokens=16, context=4096)
    assert parse_lengths("512, 2k,32K") == [512, 2048, 32768]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(SambayError, match="--lengths"):
        parse_lengths("512,abc")
    with pytest.raises(SambayError, match="--depths"):
        parse_depths("1.5")


# ---- math: answers -----------------------------------------------------------------------------------


def test_extract_boxed():
    assert math_eval.extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert math_eval.extract_boxed(r"\boxed{1} then \boxed{ {a}{b{c}} } end") == "{a}{b{c}}"
    assert math_eval.extract_boxed(r"\boxed{3} and finally \boxed{4") == "3"  # cut off mid-box
    assert math_eval.extract_boxed(r"\boxed{3} or \fbox{5}") == "5"
    assert math_eval.extract_boxed("the answer is 42") is None


def test_equivalence_by_math_verify():
    assert math_eval.is_equivalent(r"\frac{1}{2}", "0.5")
    assert math_eval.is_equivalent("0.5", r"\frac12")
    assert math_eval.is_equivalent(r"2\sqrt{3}", r"\sqrt{12}")
    assert math_eval.is_equivalent("204", "204")
    assert not math_eval.is_equivalent("205", "204")
    assert not math_eval.is_equivalent(None, "204")


def test_load_problems_keys_and_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1?", "answer": 2}\n\n'
                    '{"question": "Half?", "solution": "It is \\\\boxed{\\\\frac{1}{2}}."}\n')
    assert math_eval.load_problems(data) == [math_eval.Problem("1+1?", "2"), math_eval.Problem("Half?", r"\frac{1}{2}")]
    data.write_text('{"problem": "1+1?", "answer": 2}\n{"problem": "x"\n')
    with pytest.raises(SambayError, match=r"d.jsonl:2: not valid JSON"):
        math_eval.load_problems(data)
    data.write_text('{"problem": "1+1?"}\n')
    with pytest.raises(SambayError, match=r"d.jsonl:1: needs an 'answer'"):
        math_eval.load_problems(data)
    with pytest.raises(SambayError, match="no data file"):
        math_eval.load_problems(tmp_path / "missing.jsonl")


# ---- math: the loop ----------------------------------------------------------------------------------

PROBLEMS = [math_eval.Problem("What is 1/2?", "0.5"), math_eval.Problem("What is 2+2?", "4"),
            math_eval.Problem("What is 3*3?", "9")]


def by_seed(prompt, params):
    """Problem 0 always right (in another form), problem 1 never boxed, problem 2 right on odd seeds."""
    if "1/2" in prompt:
        return r"Halve it: \boxed{\frac{1}{2}}"
    if "2+2" in prompt:
        return "four, I think"
    return rf"\boxed{{{9 if params.seed % 2 else 8}}}"


def expected_pass1(settings):
    odd = sum(math_eval.sample_seed(settings.seed, 2, j) % 2 for j in range(settings.samples))
    return (1 + 0 + odd / settings.samples) / 3


def test_pass1_is_the_mean_over_problems_of_the_fraction_right():
    settings = math_eval.MathSettings(samples=6, seed=5)
    gen = scripted(by_seed)
    score = math_eval.run(PROBLEMS, gen, settings)
    assert score["pass@1"] == pytest.approx(expected_pass1(settings))
    assert 0 < score["per_problem"][2] < 1 and score["per_problem"][:2] == [1.0, 0.0]
    assert score["boxed_fraction"] == pytest.approx(2 / 3)
    assert len(gen.calls) == 18 and all(math_eval.INSTRUCTION in p for p in gen.calls)


def test_resume_after_an_interruption(tmp_path):
    settings = math_eval.MathSettings(samples=4, seed=1)
    header = {"model": "scripted"}
    full = math_eval.run(PROBLEMS, scripted(by_seed), settings, math_eval.ResultsFile(tmp_path / "a.jsonl", header))

    def interrupted(prompts, params):
        for n, item in enumerate(scripted(by_seed)(prompts, params)):
            if n == 5:
                raise KeyboardInterrupt
            yield item

    out = tmp_path / "b.jsonl"
    with pytest.raises(KeyboardInterrupt):
        math_eval.run(PROBLEMS, interrupted, settings, math_eval.ResultsFile(out, header))
    assert len(out.read_text().splitlines()) == 1 + 5
    with out.open("a") as f:
        f.write('{"problem": 2, "sam')  # killed in the middle of a line
    rerun, bars = scripted(by_seed), []

    def progress(total, done):
        bars.append([total, done])
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n: bars[-1].__setitem__(1, bars[-1][1] + n)))

    again = math_eval.run(PROBLEMS, rerun, settings, math_eval.ResultsFile(out, header), progress=progress)
    assert len(rerun.calls) == 12 - 5 and bars == [[12, 12]]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == {"settings": header}
    keys = [(r["problem"], r["sample"]) for r in lines[1:]]
    assert sorted(keys) == [(i, j) for i in range(3) for j in range(4)]  # each once
    assert again == full
    done = scripted(by_seed)
    assert math_eval.run(PROBLEMS, done, settings, math_eval.ResultsFile(out, header)) == full
    assert done.calls == []


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "r.jsonl"
    math_eval.run(PROBLEMS, scripted(by_seed), math_eval.MathSettings(samples=2),
                  math_eval.ResultsFile(out, {"model": "m", "samples": 2}))
    with pytest.raises(SambayError, match=r"different settings \(samples: 2 there, 3 here\)"):
        math_eval.ResultsFile(out, {"model": "m", "samples": 3}).load()
    out.write_text("hello\n")
    with pytest.raises(SambayError, match="not a 'sambay eval math' results file"):
        math_eval.ResultsFile(out, {"model": "m"}).load()


def test_max_new_tokens_is_clamped_to_the_context(tok, capsys):
    def render(message):
        return message

    longest = max(len(tok.encode(math_eval.user_message(p))) for p in PROBLEMS)
    assert _fit_budget(PROBLEMS, tok, render, 4096, 100) == 100
    assert _fit_budget(PROBLEMS, tok, render, 4096, 32768) == 4096 - longest
    assert "lowered to" in capsys.readouterr().err
    with pytest.raises(SambayError, match="fills the model's context"):
        _fit_budget(PROBLEMS, tok, render, longest, 10)


# ---- the Engine-backed generate function -------------------------------------------------------------


def test_engine_generate_stops_at_the_first_newline(model, tok):
    prompts = ["ROMEO:\n", "JULIET:\nO Romeo", "KING:\n"]
    free = dict(engine_generate(model, tok, 2)(prompts, [SamplingParams(max_new_tokens=24)] * 3))
    cut = dict(engine_generate(model, tok, 2)(prompts, [SamplingParams(max_new_tokens=24, stop=["\n"])] * 3))
    assert sorted(cut) == [0, 1, 2]
    assert any("\n" in t for t in free.values())  # the stop string had something to cut
    assert all(cut[i] == first_line(free[i]) for i in range(3))


# ---- end to end --------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(["--threads", "1", "eval", *argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def test_phonebook_command(capsys):
    code, lines, err = run_cli(capsys, "phonebook", "--lengths", "256,512", "--samples", "2", "--batch-size", "2")
    assert code == 0, err
    assert "phonebook" in err  # the progress bar
    assert lines[1].split() == ["length", "prompt", "tokens", "samples", "correct", "accuracy"]
    assert [row.split()[0] for row in lines[2:4]] == ["256", "512"] and lines[2].endswith("%")
    result = json.loads(lines[-1])
    assert result["eval"] == "phonebook" and set(result["accuracy"]) == {"256", "512"}
    assert all(r["samples"] == 2 and r["prompt_tokens"] <= r["length"] for r in result["results"])


def test_needle_command(capsys):
    code, lines, err = run_cli(capsys, "needle", "--lengths", "256", "--depths", "0,1", "--samples", "1")
    assert code == 0, err
    result = json.loads(lines[-1])
    assert result["eval"] == "needle" and set(result["accuracy"]) == {"256"}
    assert [(r["length"], r["depth"]) for r in result["results"]] == [(256, 0.0), (256, 1.0)]


def test_math_command_resumes(tmp_path, capsys):
    data = tmp_path / "probs.jsonl"
    data.write_text("\n".join(json.dumps({"problem": p.problem, "answer": p.answer}) for p in PROBLEMS[:2]))
    out = tmp_path / "res.jsonl"
    argv = ["math", "--data", str(data), "--out", str(out), "--samples", "2", "--max-new-tokens", "6",
            "--batch-size", "4", "--seed", "3"]
    code, lines, err = run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads(lines[-1])
    assert result["problems"] == 2 and result["samples_per_problem"] == 2 and 0 <= result["pass@1"] <= 1
    records = out.read_text().splitlines()
    assert len(records) == 1 + 4 and json.loads(records[0])["settings"]["temperature"] == 0.6
    code, lines, err = run_cli(capsys, *argv)  # nothing left to do: same score, no new lines
    assert code == 0 and json.loads(lines[-1])["pass@1"] == result["pass@1"]
    assert out.read_text().splitlines() == records
    code, _, err = run_cli(capsys, *argv[:-2], "--seed", "4")
    assert code == 2 and err.strip().splitlines()[-1].startswith("sambay: error: ") and "seed: 3 there, 4 here" in err


@pytest.mark.parametrize("argv, message", [
    (["phonebook", "--lengths", "8192"], "beyond the model's context of 4096"),
    (["needle", "--depths", "2"], "--depths must be between 0"),
    (["phonebook", "--samples", "0"], "--samples must be at least 1"),
    (["math", "--data", "nowhere.jsonl"], "no data file at nowhere.jsonl"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    code, lines, err = run_cli(capsys, *argv)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("sambay: error: ") and message in last and "Traceback" not in err
