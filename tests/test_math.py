"""Math data: the MetaMathQA / GSM8K / MATH file formats, answer extraction and normalisation, exact match, the
reasoning-gym ``gsm-symbolic`` set, and a short ``peftlab train --data gsm-symbolic`` run on a tiny random GPT-2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_lm

from peftlab.cli import main
from peftlab.data import (
    MATH_FORMATS,
    DataError,
    extract_answer,
    file_format,
    generate_gsm_symbolic,
    normalize_answer,
    parse_number,
    read_instructions,
)
from peftlab.metrics import exact_match
from peftlab.recipes.text import causal_lm

# A few records in each data set's own layout, written for these tests (same columns and answer conventions).
METAMATHQA = [
    {"query": "A baker makes 14 loaves a day. How many loaves does she make in 3 weeks?",
     "response": "There are 7 * 3 = 21 days in 3 weeks.\nShe makes 14 * 21 = 294 loaves.\nThe answer is: 294",
     "type": "GSM_Rephrased", "original_question": "A baker makes 14 loaves a day. How many in 3 weeks?"},
    {"query": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
     "response": "We have $\\frac{1}{2} + \\frac{1}{4} = \\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.\n"
                 "The answer is: \\frac{3}{4}",
     "type": "MATH_AnsAug", "original_question": "What is $\\frac{1}{2} + \\frac{1}{4}$?"},
]
GSM8K = [
    {"question": "Ali has 1,200 dollars and spends 450 dollars on a bike. How much money does he have left?",
     "answer": "He has 1200 - 450 = <<1200-450=750>>750 dollars left.\n#### 750"},
    {"question": "A pen costs $2 and a notebook costs 3 times as much. What do 4 notebooks cost?",
     "answer": "A notebook costs 2 * 3 = $<<2*3=6>>6.\nFour notebooks cost 4 * 6 = $<<4*6=24>>24.\n#### 24"},
    {"question": "A tank holds 2,500 litres and loses 1,000 litres. How many litres are left?",
     "answer": "2500 - 1000 = <<2500-1000=1500>>1500 litres are left.\n#### 1,500"},
]
MATH = [
    {"problem": "Find the midpoint of the segment with endpoints $(1, 4)$ and $(0, 2)$.", "level": "Level 2",
     "type": "Algebra", "solution": "The midpoint is $\\left(\\frac{1+0}{2}, \\frac{4+2}{2}\\right) = "
                                    "\\boxed{\\left(\\frac{1}{2}, 3\\right)}$."},
    {"problem": "Compute $\\sqrt{36} \\cdot 2$.", "level": "Level 1", "type": "Prealgebra",
     "solution": "Since $\\sqrt{36} = 6$, the product is $6 \\cdot 2 = \\boxed{12}$."},
]


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


# -- normalisation and extraction -------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [
    ("1,000", "1000"), ("1000.00", "1000"), ("18.0", "18"), ("+5", "5"), ("3/4", "0.75"), ("\\frac{3}{4}", "0.75"),
    ("\\dfrac34", "3/4"), ("-\\frac{1}{2}", "-0.5"), ("$1,250.", "1250"), ("42.", "42"), ("12,345.50", "12345.5"),
    ("50\\%", "50"), ("90^\\circ", "90"), ("\\$5", "5"), ("\\left( 1, 2 \\right)", "(1,2)"), ("x\\!+\\,1", "x+1"),
    ("\\text{Evelyn}", "evelyn"), ("1{,}000", "1000"), ("6/8", "3/4"),
    ("(\\frac12,\\sqrt2)", "(\\frac{1}{2},\\sqrt{2})"),
])
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [
    ("1,000", "100"), ("0.33", "1/3"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("(1,2)", "(2,1)"), ("-3", "3"),
    ("1,2", "12"),  # a pair, not a thousands separator
])
def test_normalize_answer_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_parse_number_values():
    assert parse_number("1,000") == 1000 and parse_number(".5") == parse_number("1/2") == parse_number("\\frac{1}{2}")
    assert parse_number("-\\frac{3}{4}") == parse_number("\\frac{-3}{4}") == -0.75
    for text in ("1e3", "1_000", "3/0", "x", "1,00", "\\frac{a}{2}", ""):
        assert parse_number(text) is None
    assert normalize_answer("1000.00") == "1000" and normalize_answer("0.75") == "3/4"


@pytest.mark.parametrize("text, answer", [
    ("so 3 + 4 = 7.\nThe answer is: 7", "7"), ("Natalia sold 72 clips.\n#### 72", "72"),
    ("so it is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{\\left(\\frac{1}{2}, 3\\right)}", "\\left(\\frac{1}{2}, 3\\right)"),
    ("\\boxed{\\frac{3}{4}}.\nThe answer is: 0.75", "0.75"), ("The answer is: \\boxed{5}", "5"),
    ("\\fbox{7}", "7"), ("costs $\\boxed{\\$5.50}$.", "5.5"), ("#### $1,250.", "1250"), ("#### $18.$", "18"),
    ("\\boxed{(0,100]}", "(0,100]"), ("\\boxed{unclosed", None), ("+5", "+5"), ("3/4", "3/4"), ("five", None),
])
def test_extract_answer_reads_every_format(text, answer):
    assert extract_answer(text) == answer


def test_each_format_extracts_only_its_own_answer():
    meta, gsm, math_ = MATH_FORMATS
    assert (meta.name, gsm.name, math_.name) == ("MetaMathQA", "GSM8K", "MATH")
    assert meta.extract(METAMATHQA[1]["response"]) == "\\frac{3}{4}"
    assert [gsm.extract(r["answer"]) for r in GSM8K] == ["750", "24", "1500"]
    assert [math_.extract(r["solution"]) for r in MATH] == ["\\left(\\frac{1}{2}, 3\\right)", "12"]
    assert gsm.extract(METAMATHQA[0]["response"]) is None and meta.extract(GSM8K[0]["answer"]) is None
    assert math_.extract(GSM8K[0]["answer"]) is None


def test_exact_match_compares_normalised_answers():
    preds = ["so 750.\n#### 750.00", "The answer is: $24", "#### 1500", "The answer is: 0.75",
             "$\\boxed{\\left( \\frac12, 3 \\right)}$", "The answer is: 13", "Positive.", "no answer"]
    golds = [GSM8K[0]["answer"], GSM8K[1]["answer"], GSM8K[2]["answer"], METAMATHQA[1]["response"],
             MATH[0]["solution"], MATH[1]["solution"], "positive", "#### 3"]
    assert exact_match(preds, golds) == pytest.approx(6 / 8)
    # the per-task scores of the recipe use the same rule
    scores = causal_lm.score_answers(preds[:3], golds[:3], ["gsm", "gsm", "other"])
    assert scores["exact_match"] == 1.0 and scores["exact_match_by_task"] == {"gsm": 1.0, "other": 1.0}


# -- file formats ----------------------------------------------------------------------------------------------------
def test_read_the_three_math_formats(tmp_path):
    meta = read_instructions(write(tmp_path / "metamathqa.json", METAMATHQA))
    gsm = read_instructions(write(tmp_path / "gsm8k.jsonl", GSM8K))
    math_ = read_instructions(write(tmp_path / "math.json", {"data": MATH}))
    assert meta[0] == {"instruction": METAMATHQA[0]["query"], "input": "", "output": METAMATHQA[0]["response"]}
    assert gsm["instruction"] == [r["question"] for r in GSM8K] and gsm["output"] == [r["answer"] for r in GSM8K]
    assert math_[1] == {"instruction": MATH[1]["problem"], "input": "", "output": MATH[1]["solution"]}
    assert [extract_answer(o) for o in meta["output"]] == ["294", "\\frac{3}{4}"]
    assert [extract_answer(o) for o in math_["output"]] == ["\\left(\\frac{1}{2}, 3\\right)", "12"]


def test_file_format_is_decided_by_the_columns(tmp_path):
    names = {f.name: f for f in MATH_FORMATS}
    assert file_format(["instruction", "input", "output"]) is None
    assert file_format(["instruction", "output", "query", "response"]) is None  # Alpaca first
    assert file_format(["query", "response", "type"]) is names["MetaMathQA"]
    assert file_format(["question", "answer"]) is names["GSM8K"]
    assert file_format(["problem", "solution", "answer", "level"]) is names["MATH"]  # MATH-500 has `answer` too
    with pytest.raises(DataError, match=r"f\.json: records have keys \['problem', 'text'\]; expected .*"
                                        r"\{problem, solution\} \(MATH\)"):
        file_format({"problem", "text"}, "f.json")


def test_records_without_a_final_answer_are_named(tmp_path):
    no_answers = [{"question": r["question"], "answer": r["answer"].rsplit("####", 1)[0]} for r in GSM8K]
    with pytest.raises(DataError) as err:
        read_instructions(write(tmp_path / "gsm8k.jsonl", no_answers))
    message = str(err.value)
    assert "\n" not in message and "gsm8k.jsonl: no final answer in 'answer' of any of the 3 records;" in message
    assert "a GSM8K file needs a last line '#### N' in every solution" in message
    partly = [MATH[0], {**MATH[1], "solution": "The product is 12."}]
    with pytest.raises(DataError, match=r"no final answer in 'solution' of record 2 \(of 2\); a MATH file needs a "
                                        r"'\\boxed\{\.\.\.\}' answer"):
        read_instructions(write(tmp_path / "math.json", partly))
    many = [{"query": f"q{i}", "response": "no answer"} for i in range(8)] + METAMATHQA
    with pytest.raises(DataError, match=r"records 1, 2, 3, 4, 5 and 3 more \(of 10\); .* 'The answer is: N'"):
        read_instructions(write(tmp_path / "meta.json", many))


def test_unparseable_math_file_exits_2_with_one_line(tmp_path, capsys):
    data = write(tmp_path / "gsm8k.jsonl", [{**r, "answer": "It is 5."} for r in GSM8K])
    code = main(["train", "--task", "causal-lm", "--data", str(data), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "no final answer in 'answer' of any of the 3 records" in lines[0] and "'#### N'" in lines[0]


def test_load_records_splits_a_math_file(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(30)]
    records = causal_lm.load_records(str(write(tmp_path / "gsm8k.json", rows)))
    assert {k: len(v) for k, v in records.items()} == {"train": 24, "validation": 3, "test": 3}
    assert all(extract_answer(o) is not None for o in records["test"]["output"])


# -- gsm-symbolic ------------------------------------------------------------------------------------------------------
def test_gsm_symbolic_is_deterministic_and_ends_with_the_gsm8k_answer():
    import reasoning_gym

    data = generate_gsm_symbolic(40, seed=3)
    assert data.column_names == ["instruction", "input", "output"] and len(set(data["instruction"])) == 40
    assert generate_gsm_symbolic(40, seed=3)[:] == data[:] and generate_gsm_symbolic(10, seed=3)[:] == data[:10]
    assert generate_gsm_symbolic(10, seed=4)["instruction"] != data["instruction"][:10]
    source = {e["question"]: e["answer"] for e in reasoning_gym.create_dataset("gsm_symbolic", size=60, seed=3)}
    suffix = " Give the result as your final answer. Do not include units."
    for row in data:
        assert not row["instruction"].endswith(suffix) and row["input"] == ""
        last = row["output"].splitlines()[-1]
        assert last == f"#### {source[row['instruction'] + suffix]}" and row["output"].count("####") == 1
        assert extract_answer(row["output"]) == last[5:]


def test_gsm_symbolic_split_and_missing_package(monkeypatch):
    records = causal_lm.load_records("gsm-symbolic")
    assert {k: len(v) for k, v in records.items()} == {"train": 1600, "validation": 200, "test": 200}
    assert not set(records["test"]["instruction"]) & set(records["train"]["instruction"])
    assert causal_lm.load_records("gsm-symbolic")["test"][:5] == records["test"][:5]
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if it were not installed
    with pytest.raises(DataError, match="gsm-symbolic needs reasoning-gym .* requirements-assets.txt"):
        generate_gsm_symbolic(2)


# -- gsm-easy ----------------------------------------------------------------------------------------------------------
def test_gsm_easy_is_deterministic_two_step_integer_problems():
    from peftlab.data.instructions import generate_gsm_easy

    data = generate_gsm_easy(30, seed=5)
    assert data.column_names == ["instruction", "input", "output"] and len(set(data["instruction"])) == 30
    assert generate_gsm_easy(30, seed=5)[:] == data[:] and generate_gsm_easy(10, seed=5)[:] == data[:10]
    assert not set(generate_gsm_easy(30, seed=6)["instruction"]) & set(data["instruction"])
    for row in data:
        worked, last = row["output"].rsplit("\n", 1)
        assert last.startswith("#### ") and row["output"].count("####") == 1
        assert len(worked.splitlines()) == 2  # two steps
        assert parse_number(last[5:]) == int(last[5:])  # an integer answer, which exact match reads back
        assert causal_lm.score_answers([row["output"]], [row["output"]])["exact_match"] == 1.0


def test_gsm_easy_splits_do_not_overlap_and_exact_match_reads_its_answers():
    records = causal_lm.load_records("gsm-easy")
    sizes = {k: len(v) for k, v in records.items()}
    assert sizes == {"train": 1600, "validation": 200, "test": 200}
    questions = [set(v["instruction"]) for v in records.values()]
    assert sum(map(len, questions)) == 2000 and len(set.union(*questions)) == 2000  # no question in two splits
    golds = records["test"]["output"][:3]
    answers = [extract_answer(g) for g in golds]
    right = [f"Some steps.\n#### {a}.0" for a in answers]  # 15.0 = 15
    wrong = [f"#### {int(a) + 1}" for a in answers]
    assert causal_lm.score_answers(right, golds)["exact_match"] == 1.0
    assert causal_lm.score_answers(wrong, golds)["exact_match"] == 0.0
    assert causal_lm.score_answers(answers, golds)["exact_match"] == 1.0  # a bare number counts


@pytest.fixture(scope="module")
def tiny_math_lm(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (hidden 32) with a byte-level BPE tokenizer trained on the prompts and gsm-symbolic text."""
    folder = tmp_path_factory.mktemp("math_lm")
    texts = [causal_lm.PROMPT] * 10 + [r["instruction"] + "\n" + r["output"] for r in generate_gsm_symbolic(200)]
    save_tiny_lm(folder, texts, vocab_size=1000)
    return folder


def test_train_on_gsm_symbolic_reports_exact_match(tiny_math_lm, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--task", "causal-lm", "--model", str(tiny_math_lm), "--data", "gsm-symbolic",
                 "--method", "lora", "--max-steps", "2", "--max-train-samples", "16", "--max-eval-samples", "4",
                 "--max-test-samples", "4", "--batch-size", "8", "--max-new-tokens", "8", "--no-initial-eval",
                 "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "gsm-symbolic" and metrics["metric"] == "exact_match"
    assert metrics["num_train"] == 16 and metrics["num_test"] == 4 and 0 <= metrics["test"]["exact_match"] <= 1
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(extract_answer(r["reference"]) is not None for r in rows)
    assert all(r["reference"].splitlines()[-1].startswith("#### ") for r in rows)


def test_gsm_symbolic_has_its_own_length_defaults_and_flags_win():
    from peftlab.recipes.options import RunOptions

    worked = RunOptions(task="causal-lm", data="gsm-symbolic", method="lora").resolved()
    assert (worked.max_length, worked.max_new_tokens) == (512, 256)  # solutions are long: 64 tokens cut them
    plain = RunOptions(task="causal-lm", method="lora").resolved()
    assert (plain.data, plain.max_length, plain.max_new_tokens) == ("arithmetic", 256, 64)
    easy = RunOptions(task="causal-lm", data="gsm-easy", method="lora").resolved()
    assert (easy.max_length, easy.max_new_tokens) == (256, 128)  # two-step solutions: < 100 + 80 tokens
    given = RunOptions(task="causal-lm", data="gsm-symbolic", method="lora", max_new_tokens=32).resolved()
    assert (given.max_length, given.max_new_tokens) == (512, 32)
