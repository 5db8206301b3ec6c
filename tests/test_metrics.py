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
    lower_and_tokenize,
    metrics_by_group,
    perplexity,
    trainer_compute_metrics,
)


def test_default_accuracy_and_macro_f1():
    # class 1: tp 2, fp 1, fn 0 -> F1 0.8; class 0: tp 1, fp 0, fn 1 -> F1 2/3
    result = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1])
    assert result == pytest.approx({"accuracy": 0.75, "f1_macro": (0.8 + 2 / 3) / 2})


def test_metrics_per_group_are_each_groups_own_by_hand():
    logits = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]])  # 0, 1, 1, 0, 1, 0
    labels, groups = [0, 1, 0, 1, 1, 1], ["nyt", "movie", "nyt", "movie", "nyt", "movie"]
    # nyt: (0, 0), (1, 0), (1, 1) -> accuracy 2/3; class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 1, fn 0 -> 2/3
    # movie: (1, 1), (0, 1), (0, 1) -> accuracy 1/3; class 0 never a label -> F1 0; class 1: tp 1, fn 2 -> 1/2
    result = metrics_by_group(logits, labels, groups)
    assert list(result["accuracy_by_domain"]) == ["movie", "nyt"]
    assert result == {"accuracy_by_domain": pytest.approx({"movie": 1 / 3, "nyt": 2 / 3}),
                      "f1_macro_by_domain": pytest.approx({"movie": 0.25, "nyt": 2 / 3})}
    assert metrics_by_group(logits, labels, groups, "sst2", name="task") == {
        "accuracy_by_task": pytest.approx({"movie": 1 / 3, "nyt": 2 / 3})}
    assert metrics_by_group([0.5, 0.1], [0.4, 0.2], ["a", "b"], "stsb") == {}  # regression: nothing per group
    with pytest.raises(ValueError, match="5 groups for 6 labels"):
        metrics_by_group(logits, labels, groups[:5])


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
        assert "java" in result["skipped"]["meteor"]
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        generation_metrics(["a", "b"], [["a"]])


def test_exact_match():
    preds = ["so 5 + 5 = 10.\nThe answer is: 10", "The answer is: $1,000.", "#### 7", "Positive", "no idea"]
    golds = ["Tom has 10.\n#### 10", "The answer is: 1000", "The answer is: 8", "positive", "The answer is: 3"]
    assert exact_match(preds, golds) == pytest.approx(3 / 5)


def test_perplexity():
    assert perplexity(math.log(10)) == pytest.approx(10)
    assert perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf


# -- multi-reference WebNLG / DART metrics: TER, chrF (sacrebleu), METEOR, CIDEr (pycocoevalcap) -------------------
def test_identical_texts_score_bleu_100_ter_0_chrf_100():
    hyps = ["the cat sat on the mat", "a dog ran in the park today"]
    result = generation_metrics(hyps, [[h] for h in hyps])
    assert (result["bleu"], result["ter"], result["chrf"]) == pytest.approx((100, 0, 100))
    assert generation_metrics(["a b c"], [["x y z"]])["chrf"] == 0


def test_ter_by_hand_and_its_best_reference():
    # one substitution in 4 reference words: 1/4; the second reference is matched exactly: 0
    assert generation_metrics(["a b c d"], [["a b x d"]])["ter"] == pytest.approx(25.0)
    assert generation_metrics(["a b c d"], [["q r s", "a b c d"]])["ter"] == pytest.approx(0.0)


def test_cider_by_hand_on_a_two_sentence_corpus():
    pytest.importorskip("pycocoevalcap")
    # CIDEr-D: n-gram vectors tf·idf with idf = log(2 / df) (2 inputs); an n-gram absent from the references
    # has df 1. Input 1 ("a b" for "a b"): orders 1 and 2 have cosine 1, orders 3, 4 have no n-gram -> 0;
    # score 10 · (1 + 1 + 0 + 0) / 4 = 5. Input 2 ("c e" for "c d"): unigrams {c, e} vs {c, d}, equal
    # weights log 2: clipped dot product 1 · log²2 over norms 2 · log²2 -> 1/2; bigrams share nothing;
    # 10 · (1/2) / 4 = 1.25. Equal lengths: no length penalty. Corpus CIDEr = (5 + 1.25) / 2.
    assert generation_metrics(["a b", "c e"], [["a b"], ["c d"]])["cider"] == pytest.approx(3.125)
    # an n-gram in every input's references has idf log(2/2) = 0 and counts for nothing
    assert generation_metrics(["a b", "a b"], [["a b"], ["a b"]])["cider"] == pytest.approx(0.0)


def test_meteor_runs_with_java_and_is_skipped_without(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    import shutil

    if shutil.which("java"):
        same = generation_metrics(["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]])
        assert same["meteor"] == pytest.approx(100.0) and "meteor" not in same["skipped"]
        assert generation_metrics(["q r s"], [["x y z"]])["meteor"] == 0
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = generation_metrics(["a b"], [["a b"]])
    assert "meteor" not in result and "no `java` is on PATH" in result["skipped"]["meteor"]


def test_without_pycocoevalcap_cider_is_skipped_with_the_reason(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)  # import fails
    result = generation_metrics(["a b"], [["a b"]])
    assert "cider" not in result and "pycocoevalcap==1.2" in result["skipped"]["cider"]


def test_tokenize_lower_is_the_lora_repositorys_post_processing():
    assert lower_and_tokenize("Aarhus Airport's runway is 2702.0 m.") == "aarhus airport ' s runway is 2702 . 0 m ."
    # a case-different pair: the option makes it identical
    hyps, refs = ["The Cat sat on the Mat."], [["the cat sat on the mat ."]]
    plain, lowered = generation_metrics(hyps, refs), generation_metrics(hyps, refs, tokenize_lower=True)
    # TER splits on spaces only: The→the, Cat→cat, Mat.→mat and "." inserted: 4 edits / 7 reference words
    assert plain["bleu"] < 50 and plain["ter"] == pytest.approx(400 / 7) and plain["chrf"] < 100
    assert (lowered["bleu"], lowered["ter"], lowered["chrf"]) == pytest.approx((100, 0, 100))
    assert lowered["tokenize_lower"] is True and plain["tokenize_lower"] is False
