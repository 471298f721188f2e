"""`sambay eval quant`: each format against the float model, the baseline among them."""

import json

import pytest

from sambay.cli import main
from sambay.errors import SambayError
from sambay.evals.quant import parse_format

pytestmark = pytest.mark.usefixtures("one_thread")


def test_format_names_parse_and_bad_ones_are_one_line_errors():
    assert parse_format("int4:asym-g64:fc2+lm_head")[2] == ("fc2", "lm_head")
    assert parse_format("int4:sym-g32:-")[2] == ()
    with pytest.raises(SambayError, match="unknown format"):
        parse_format("int3")


@pytest.mark.slow
def test_eval_quant_reports_every_format_against_float(tmp_path, capsys):
    """On the embedded default model (trained, with its tokenizer)."""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "quant", "--text", str(text), "--window", "64",
                 "--max-tokens", "256", "--formats", "int8,int4:rtn-g32,int4:sym-g32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["format"]: r for r in out["formats"]}
    assert set(rows) == {"int8", "int4:rtn-g32", "int4:sym-g32"}
    assert all(r["kl"] >= 0 and 0 <= r["top1"] <= 1 for r in rows.values())
    assert rows["int8"]["kl"] < rows["int4:rtn-g32"]["kl"]  # 8 bits cost less than 4
