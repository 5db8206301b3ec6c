"""Metrics against values computed by hand on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftlab.metrics import (
    GLUE_TASKS,
    classification_metrics,
    exact_match,
    generation_metrics,
    perplexity,
    trainer_compute_metrics,
)


def test_default_accuracy_and_macro_f1():
    # class 1: tp 2, fp 1, fn 0 -> F1 0.8; class 0: tp 1, fp 0, fn 1 -> F1 2/3
    result = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1])
    assert result == pytest.approx({"accuracy": 0.75, "f1_macro": (0.8 + 2 / 3) / 2})


def test_matthews_of_known_confusion_matrix():
    # TP 3, TN 2, FP 1, FN 1: (3*2 - 1*1) / sqrt(4*4*3*3) = 5/12
    labels = [1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 1]
    assert classification_metrics(preds, labels, "cola") == pytest.approx({"matthews_correlation": 5 / 12})


def test_mrpc_accuracy_and_binary_f1_from_logits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # argmax 1, 0, 1, 0
    result = classification_metrics(logits, [1, 1, 0, 0], "mrpc")
    # tp 1, fp 1, fn 1 -> precision = recall = 1/2 -> F1 1/2; accuracy 2/4
    assert result == pytest.approx({"accuracy": 0.5, "f1": 0.5})


def test_stsb_correlations():
    # x = (1, 2, 3), y = (1, 3, 2): cov 1, var 2 and 2 -> r = 0.5; the ranks are the values -> rho = 0.5
    assert classification_metrics([1.0, 3.0, 2.0], [1.0, 2.0, 3.0], "stsb") == pytest.approx(
        {"pearson": 0.5, "spearmanr": 0.5})
    # monotone but not linear: Spearman 1, Pearson below 1
    result = classification_metrics(np.array([[1.0], [2.0], [10.0]]), [1.0, 2.0, 3.0], "stsb")
    assert result["spearmanr"] == pytest.approx(1.0) and result["pearson"] < 0.97


def test_glue_task_table_and_errors():
    assert GLUE_TASKS["mnli"].num_labels == 3 and GLUE_TASKS["stsb"].num_labels == 1
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert set(classification_metrics([0, 1], [0, 1], "sst2")) == {"accuracy"}
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst'"):
        classification_metrics([0], [0], "sst")
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        classification_metrics([0, 1, 1], [0, 1])


def test_trainer_compute_metrics_takes_logits_tuple():
    compute = trainer_compute_metrics("sst2")
    logits = (np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), np.zeros((3, 4)))  # extra model outputs
    assert compute((logits, np.array([0, 1, 1]))) == pytest.approx({"accuracy": 2 / 3})


def test_bleu_by_hand():
    assert generation_metrics(["the cat sat on the mat"], [["the cat sat on the mat"]])["bleu"] == pytest.approx(100)
    # n-gram precisions 5/6, 4/5, 3/4, 2/3, equal lengths: BLEU = (1/3) ** (1/4)
    result = generation_metrics(["a b c d e f"], [["a b c d e g"]])
    assert result["bleu"] == pytest.approx(100 * (1 / 3) ** 0.25)
    # all precisions 1, hypothesis 5 tokens vs reference 6: brevity penalty exp(1 - 6/5)
    assert generation_metrics(["a b c d e"], [["a b c d e f"]])["bleu"] == pytest.approx(100 * math.exp(-0.2))
    # several references, in varying numbers per hypothesis: each hypothesis matches one of them
    multi = generation_metrics(["a b c d e", "v w x y z"], [["q r s t u", "a b c d e"], ["v w x y z"]])
    assert multi["bleu"] == pytest.approx(100)


def test_nist_and_rouge_by_hand():
    # one 4-token reference of distinct words: each unigram carries log2(4/1) = 2 bits, longer n-grams
    # log2(count(prefix)/count(ngram)) = 0, so NIST = 4 * 2 / 4 = 2
    assert generation_metrics(["a b c d"], [["a b c d"]])["nist"] == pytest.approx(2.0)
    # LCS of "a c d e" and "a b c d" is "a c d": P = R = 3/4 -> F = 0.75; the best reference counts
    assert generation_metrics(["a c d e"], [["x y", "a b c d"]])["rouge_l"] == pytest.approx(75.0)


def test_unavailable_metrics_are_reported_not_raised():
    result = generation_metrics(["a dog ran"], [["a cat sat"]])
    for name in ("meteor", "cider"):
        assert (name in result) != (name in result["skipped"])
    if "meteor" in result["skipped"]:
        assert "WordNet" in result["skipped"]["meteor"]
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        generation_metrics(["a", "b"], [["a"]])


def test_exact_match():
    preds = ["so 5 + 5 = 10.\nThe answer is: 10", "The answer is: $1,000.", "#### 7", "Positive", "no idea"]
    golds = ["Tom has 10.\n#### 10", "The answer is: 1000", "The answer is: 8", "positive", "The answer is: 3"]
    assert exact_match(preds, golds) == pytest.approx(3 / 5)


def test_perplexity():
    assert perplexity(math.log(10)) == pytest.approx(10)
    assert perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf
