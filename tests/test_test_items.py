"""test_items.jsonl: every task's final test evaluation writes its per-item scores, from which the test metric in
metrics.json is recomputed; compare's interval column and paired table equal peftlab.stats on those files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_tiny_classifier, write_keyword_csv
from test_multiple_choice import write_rows
from test_recipes import (
    tiny_lm,  # noqa: F401  (the fixture: a tiny random GPT-2 with its own BPE tokenizer)
    write_instructions,
)

from peftlab import stats
from peftlab.cli import main
from peftlab.commands.compare import item_statistics, markdown_table
from peftlab.recipes.test_items import read_items

TOLERANCE = 1e-9  # the metric recomputed from the items' summed statistics vs the one in metrics.json (float64 sums)


def checked_items(folder: Path, count_key: str = "num_test") -> list[str]:
    """Assert the items of a run: one row per test item, the test metric recomputed from them; return the keys."""
    metrics = json.loads((folder / "metrics.json").read_text())
    items = read_items(folder)
    assert items is not None and metrics["test_items"]["num_items"] == len(items.rows) == metrics[count_key]
    x = stats.statistics(items.aggregate, [items.rows])
    assert stats.metric(items.aggregate, x)[0] == pytest.approx(metrics["test"][metrics["metric"]], abs=TOLERANCE)
    assert len(set(items.keys)) == len(items.keys)
    return items.keys


@pytest.fixture(scope="module")
def classification_compare(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("items")
    save_tiny_classifier(root / "model")
    data = write_keyword_csv(root / "data.csv", 120, seed=1)
    out = root / "cmp"
    assert main(["compare", "--model", str(root / "model"), "--data", str(data), "--methods", "hra,lora",
                 "--seeds", "2", "--max-steps", "2", "--batch-size", "16", "--lr", "5e-2", "--no-initial-eval",
                 "--output-dir", str(out)]) == 0
    return out


def test_classification_items_give_the_accuracy_and_pair_across_seeds_and_methods(classification_compare):
    keys = [checked_items(classification_compare / m / f"seed-{s}") for m in ("hra", "lora") for s in (0, 1)]
    assert all(k == keys[0] for k in keys)
    rows = read_items(classification_compare / "hra" / "seed-0").rows
    assert all(row["value"] == int(row["label"] == row["prediction"]) for row in rows)


def test_compare_interval_and_paired_table_equal_stats_on_the_items_files(classification_compare):
    result = json.loads((classification_compare / "compare.json").read_text())
    x = {m: stats.statistics("mean", [read_items(classification_compare / m / f"seed-{s}").rows for s in (0, 1)])
         for m in ("hra", "lora")}
    for row in result["rows"]:
        interval = stats.bootstrap("mean", x[row["method"]])
        assert row["ci95"] == pytest.approx([interval.low, interval.high], abs=1e-12)
        assert row["mean"] == pytest.approx(interval.estimate, abs=1e-12)  # metrics.json's accuracy, mean over seeds
    paired = result["paired"]
    assert paired["baseline"] == "lora" and paired["seeds"] == 2 and paired["items"] == len(x["hra"][0])
    diff = stats.paired_difference("mean", x["lora"], x["hra"])
    (row,) = paired["rows"]
    assert row["method"] == "hra" and row["difference"] == pytest.approx(diff.estimate, abs=1e-12)
    assert row["ci95"] == pytest.approx([diff.low, diff.high], abs=1e-12) and row["p_value"] == diff.p_value
    table = (classification_compare / "compare.md").read_text()
    ci = result["rows"][0]["ci95"]
    assert f"| [{ci[0]:.4f}, {ci[1]:.4f}] | 2 |" in table and "Paired difference to lora" in table
    assert f"| hra | {diff.estimate:+.4f} | [{diff.low:+.4f}, {diff.high:+.4f}] | {diff.p_value:.4f} |" in table


def test_eval_items_equal_the_runs_own(classification_compare, tmp_path):
    run = classification_compare / "hra" / "seed-0"
    assert main(["eval", "--adapter", str(run), "--items", str(tmp_path / "eval.jsonl"),
                 "--output", str(tmp_path / "eval.json")]) == 0
    written = json.loads((tmp_path / "eval.json").read_text())["test_items"]
    assert written["aggregate"] == "mean" and written["file"] == str(tmp_path / "eval.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows == read_items(run).rows


def test_compare_without_items_keeps_the_old_table_with_a_note(classification_compare, tmp_path):
    result = json.loads((classification_compare / "compare.json").read_text())
    runs = [{**r, "folder": str(classification_compare / r["folder"])} for r in result["runs"]]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))  # an old run folder
    runs[0]["folder"] = str(tmp_path / "old")
    rows = [{k: v for k, v in r.items() if k != "ci95"} for r in result["rows"]]
    paired = item_statistics(tmp_path, runs, rows)
    assert all(r["ci95"] is None for r in rows) and paired["rows"] == []
    assert "no per-item test scores" in paired["note"]
    table = markdown_table(rows, "accuracy", {}, paired)
    assert "| n/a | 2 |" in table and "Note: no per-item test scores" in table and "Paired difference" not in table


def test_causal_lm_items_give_the_exact_match_with_the_same_keys_for_two_seeds(tiny_lm, tmp_path):  # noqa: F811
    data = write_instructions(tmp_path / "train.jsonl")
    keys = []
    for seed in (0, 1):
        out = tmp_path / f"run-{seed}"
        assert main(["train", "--task", "causal-lm", "--model", str(tiny_lm), "--data", str(data), "--method", "lora",
                     "--seed", str(seed), "--max-steps", "2", "--batch-size", "8", "--max-test-samples", "6",
                     "--max-new-tokens", "8", "--no-initial-eval", "--output-dir", str(out)]) == 0
        keys.append(checked_items(out))
    assert keys[0] == keys[1]


def test_data_to_text_items_recompute_corpus_bleu_with_the_same_keys_for_two_seeds(tiny_lm, tmp_path,  # noqa: F811
                                                                                  monkeypatch):
    from peftlab import metrics
    from peftlab.data import generate_e2e

    monkeypatch.setattr(metrics, "_meteor", lambda hyps, refs: "left out here (its java start takes 10-40 s)")

    pairs = generate_e2e(30, seed=3)
    data = tmp_path / "e2e.txt"
    data.write_text("".join(f"{mr} || {ref}\n" for mr, ref in zip(pairs["mr"], pairs["ref"], strict=True)))
    keys = []
    for seed in (0, 1):
        out = tmp_path / f"run-{seed}"
        assert main(["train", "--task", "data-to-text", "--model", str(tiny_lm), "--data", str(data), "--method",
                     "lora", "--seed", str(seed), "--max-steps", "2", "--batch-size", "8", "--max-test-samples", "4",
                     "--num-beams", "1", "--max-new-tokens", "12", "--output-dir", str(out)]) == 0
        keys.append(checked_items(out, count_key="num_test_mrs"))
        assert read_items(out).aggregate == "bleu"
    assert keys[0] == keys[1]


def test_multiple_choice_items_give_the_macro_accuracy(tiny_lm, tmp_path):  # noqa: F811
    data = write_rows(tmp_path / "mc.jsonl")
    assert main(["eval", "--task", "multiple-choice", "--model", str(tiny_lm), "--data", str(data),
                 "--output", str(tmp_path / "m.json"), "--items", str(tmp_path / "m.jsonl")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["num_examples"] == 6 and {r["group"] for r in rows} == {"arithmetic", "world facts"}
    x = stats.statistics("macro_mean", [rows])
    assert stats.metric("macro_mean", x)[0] == pytest.approx(metrics["test"]["accuracy"], abs=1e-12)
    assert sum(r["value"] for r in rows) == metrics["test"]["correct"]


@pytest.mark.parametrize("task, metric", [("cola", "matthews_correlation"), ("stsb", "pearson"), ("sst2", "accuracy")])
def test_classification_items_recompute_each_glue_main_metric(task, metric):
    import numpy as np
    from datasets import Dataset

    from peftlab.metrics import trainer_compute_metrics
    from peftlab.recipes.text.classification import classification_items

    rng = np.random.default_rng(0)
    labels = rng.normal(size=40) if task == "stsb" else rng.integers(0, 2, 40)
    logits = rng.normal(size=(40, 1 if task == "stsb" else 2)) + (labels[:, None] if task == "stsb" else 0)
    seen: dict = {}
    scores = trainer_compute_metrics(task, seen)((logits, labels))
    rows = Dataset.from_dict({"input_ids": [[101, i, 102] for i in range(40)]})
    items = classification_items(seen, rows, metric)
    x = stats.statistics(items.aggregate, [items.rows])
    assert stats.metric(items.aggregate, x)[0] == pytest.approx(scores[metric], abs=TOLERANCE)
    assert classification_items(seen, rows, "f1") is None  # no per-item statistics for F1 as the main metric
