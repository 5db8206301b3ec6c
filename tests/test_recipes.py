"""Recipes: the method table, loss masking and answer scoring of the causal-LM recipe, and short runs of the
causal-LM and data-to-text recipes on a tiny random GPT-2 with a byte-level BPE tokenizer trained on the spot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import save_tiny_lm, tiny_bert, tiny_gpt2

from peftlab import AdapterModel
from peftlab.cli import main
from peftlab.commands.compare import markdown_table, other_metrics, summarize
from peftlab.errors import RecipeError
from peftlab.recipes.adapters import default_targets, method_specs, prepare_model
from peftlab.recipes.options import RunOptions
from peftlab.recipes.text import causal_lm, lm


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (hidden 32) and a 400-token byte-level BPE tokenizer, saved like a hub checkpoint."""
    from peftlab.data import generate_arithmetic, generate_e2e

    folder = tmp_path_factory.mktemp("lm")
    e2e = generate_e2e(40)
    texts = [causal_lm.PROMPT, causal_lm.PROMPT_WITH_INPUT] * 10 + list(e2e["mr"]) + list(e2e["ref"])
    texts += [r["instruction"] + "\n" + r["output"] for r in generate_arithmetic(100)]
    save_tiny_lm(folder, texts, vocab_size=400)
    return folder


# -- methods ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(method_specs()))
def test_every_method_name_builds_its_model(method):
    model = prepare_model(tiny_bert(), RunOptions(method=method, r=4).resolved(), classification=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    spec = method_specs()[method]
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method == "linear-probe":
        assert trainable == {"classifier.weight", "classifier.bias"}
    else:
        assert isinstance(model, AdapterModel)
        config = model.peft_config["default"]
        assert type(config) is spec.config_class and config.r == 4
        assert config.target_modules == ["query", "value"] and config.modules_to_save == ["classifier"]
        for key, value in spec.fixed.items():  # mtlora-icfm → structure="icfm"
            assert getattr(config, key) == value
        assert any("classifier" in n for n in trainable) and not any("word_embeddings" in n for n in trainable)


def test_default_targets_and_learning_rates():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert default_targets(tiny_bert()) == ["query", "value"]
    assert default_targets(tiny_gpt2()) == ["c_attn"]
    assert default_targets(llama) == ["q_proj", "v_proj"]
    assert RunOptions(method="hra").resolved().lr == 1e-2 and RunOptions(method="lora").resolved().lr == 3e-3
    with pytest.raises(RecipeError, match="known methods: hra, lora"):
        RunOptions(method="dora").resolved()
    with pytest.raises(RecipeError, match="linear-probe trains only a classification head"):
        RunOptions(task="causal-lm", method="linear-probe").resolved()
    with pytest.raises(RecipeError, match="MTLoraConfig has no field"):
        prepare_model(tiny_bert(), RunOptions(method="mtlora-shim", adapter_args={"colour": 1}).resolved(), True)


# -- causal LM: loss masking and answer scoring ------------------------------------------------------------------------
def test_loss_is_masked_on_the_prompt(tiny_lm):
    from peftlab.base_models import load_causal_lm

    _, tokenizer = load_causal_lm(str(tiny_lm))  # as the recipe loads it: pad token = EOS
    prompt = causal_lm.format_prompt("Tom has 3 apples and gets 4 more. How many?")
    response = "Tom has 3 + 4 = 7 apples.\nThe answer is: 7"
    row = lm.encode_pair(tokenizer, prompt, response, max_length=512)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and row["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][n_prompt:-1]) == response

    cut = lm.encode_pair(tokenizer, prompt, response, max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["labels"][-2:] == cut["input_ids"][-2:]
    batch = lm.collator(tokenizer)([row, cut])  # padded labels are ignored too
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1, n_prompt + 2:] == -100).all() and (batch["attention_mask"][1, n_prompt + 2:] == 0).all()


def test_encoded_records_of_two_same_named_prompt_functions_are_not_shared(tiny_lm, tmp_path):
    """Two lambdas (one qualname, ``<lambda>``) on a cache-backed dataset: the second encoding must not be read back
    from the first one's cache file, as it was while the fingerprint held only the functions' names."""
    import datasets

    from peftlab.base_models import load_causal_lm

    _, tokenizer = load_causal_lm(str(tiny_lm))
    datasets.Dataset.from_dict({"q": ["one plus one", "two plus two"], "a": ["2", "4"]}).save_to_disk(tmp_path / "d")
    rows = datasets.load_from_disk(str(tmp_path / "d"))  # backed by an arrow file: map() caches to disk
    plain = lm.encode_records(rows, tokenizer, 64, lambda row: row["q"], lambda row: row["a"])
    asked = lm.encode_records(rows, tokenizer, 64, lambda row: "Q: " + row["q"], lambda row: row["a"])
    assert plain[0]["input_ids"] == lm.encode_pair(tokenizer, "one plus one", "2", 64)["input_ids"]
    assert asked[0]["input_ids"] == lm.encode_pair(tokenizer, "Q: one plus one", "2", 64)["input_ids"]


def test_exact_match_reads_the_final_answer_per_task():
    predictions = ["3 + 4 = 7 apples.\nThe answer is: 7", "so it costs $1,000.", "#### 12", "Positive."]
    golds = ["Tom has 7 apples.\nThe answer is: 7", "#### 1000", "The answer is: 13", "positive"]
    scores = causal_lm.score_answers(predictions, golds, ["math", "math", "math", "sentiment"])
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["exact_match_by_task"] == {"math": pytest.approx(1 / 3), "sentiment": 1.0}


# -- short runs -------------------------------------------------------------------------------------------------------
def write_instructions(path: Path) -> Path:
    from peftlab.data import generate_arithmetic, generate_format_tasks

    rows = [{**r, "task": "arithmetic"} for r in generate_arithmetic(30)]
    rows += [{**r, "task": "format"} for r in generate_format_tasks(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_causal_lm_recipe_reports_exact_match_per_task_and_perplexity(tiny_lm, tmp_path):
    out = tmp_path / "run"
    data = write_instructions(tmp_path / "train.jsonl")
    code = main(["train", "--task", "causal-lm", "--model", str(tiny_lm), "--data", str(data), "--method", "hra",
                 "--max-steps", "4", "--eval-steps", "2", "--batch-size", "8", "--max-test-samples", "6",
                 "--max-new-tokens", "8", "--no-initial-eval", "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert metrics["task"] == "causal-lm" and metrics["global_step"] == 4 and metrics["num_test"] == 6
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert 0 <= test["exact_match"] <= 1 and set(test["exact_match_by_task"]) <= {"arithmetic", "format"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["prompt"].endswith("### Response:\n") for r in rows)
    assert (out / "adapter_config.json").is_file() and (out / "training_curve.png").is_file()

    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert again["exact_match"] == test["exact_match"]


def test_data_to_text_recipe_decodes_with_beam_search_and_scores(tiny_lm, tmp_path):
    from peftlab.data import generate_e2e

    pairs = generate_e2e(30, seed=3)
    data = tmp_path / "e2e.txt"  # the LoRA repository's E2E layout
    data.write_text("".join(f"{mr} || {ref}\n" for mr, ref in zip(pairs["mr"], pairs["ref"], strict=True)))
    out = tmp_path / "run"
    code = main(["train", "--task", "data-to-text", "--model", str(tiny_lm), "--data", str(data), "--method", "lora",
                 "--lr", "1e-2", "--max-steps", "4", "--batch-size", "8", "--max-test-samples", "3",
                 "--num-beams", "2", "--length-penalty", "0.8", "--no-repeat-ngram-size", "3", "--max-new-tokens", "10",
                 "--label-smoothing", "0.1", "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert metrics["decoding"] == {"num_beams": 2, "length_penalty": 0.8, "no_repeat_ngram_size": 3,
                                   "max_new_tokens": 10}
    assert {"bleu", "nist", "rouge_l"} <= set(test)
    for name in ("meteor", "cider"):  # computed, or skipped with the reason
        assert name in test or name in test["skipped"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["references"]) >= 2 for r in rows)


def test_compare_summary_reports_mean_and_sample_std():
    runs = [{"method": m, "seed": s, "lr": 1e-3, "metric": "accuracy", "value": v, "trainable_params": p,
             "total_params": 1000, "seconds_per_step": 0.5, "peak_memory_mb": 100.0, "peak_memory_kind": "rss"}
            for m, s, v, p in [("hra", 0, 0.8, 10), ("hra", 1, 0.9, 10), ("lora", 0, 0.7, 20)]]
    rows = summarize(runs, ["hra", "lora"])
    assert rows[0]["mean"] == pytest.approx(0.85) and rows[0]["std"] == pytest.approx(0.0707107, abs=1e-6)
    assert rows[1]["std"] == 0.0
    table = markdown_table(rows, "accuracy", {"max_steps": 10})
    assert "| hra | 0.001 | 0.8500 ± 0.0707 | n/a | 2 | 10 | 1.000 |" in table and "max_steps=10" in table  # no items


def test_compare_tabulates_the_other_test_metrics_per_task():
    from peftlab.commands.report_run import flat

    test = {"exact_match": 0.5, "loss": 1.2, "perplexity": 3.3, "skipped": {"cider": "why"},
            "exact_match_by_task": {"arithmetic": 0.25, "format": 0.75}}
    assert other_metrics(test, "exact_match") == {"perplexity": 3.3, "exact_match/arithmetic": 0.25,
                                                  "exact_match/format": 0.75}
    # any <metric>_by_<group> (classification's accuracy_by_domain); other nested entries (MMLU's by_subject) stay out
    grouped = {"accuracy": 0.7, "f1_macro_by_domain": {"nyt": 0.5}, "accuracy_by_domain": {"movie": 0.8, "nyt": 0.6},
               "by_subject": {"anatomy": {"accuracy": 1.0}}}
    assert other_metrics(grouped, "accuracy") == {"f1_macro/nyt": 0.5, "accuracy/movie": 0.8, "accuracy/nyt": 0.6}
    assert flat({**test, **grouped}) == {  # report's test-metrics table: the same names
        "exact_match": 0.5, "loss": 1.2, "perplexity": 3.3, "skipped/cider": "why", "exact_match/arithmetic": 0.25,
        "exact_match/format": 0.75, "accuracy": 0.7, "f1_macro/nyt": 0.5, "accuracy/movie": 0.8, "accuracy/nyt": 0.6,
        "by_subject/anatomy/accuracy": 1.0}
    runs = [{"method": "lora", "seed": s, "lr": 1e-3, "metric": "exact_match", "value": 0.5, "trainable_params": 5,
             "total_params": 10, "seconds_per_step": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "rss",
             "other_metrics": {"exact_match/format": v}} for s, v in ((0, 0.6), (1, 0.8))]
    rows = summarize(runs, ["lora"])
    assert rows[0]["other_metrics"]["exact_match/format"] == pytest.approx((0.7, 0.1414214), abs=1e-6)
    table = markdown_table(rows, "exact_match", {})
    assert "| method | exact_match/format |" in table and "| lora | 0.7000 ± 0.1414 |" in table
