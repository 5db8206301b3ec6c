"""Task metrics, computed with maintained libraries (scikit-learn, scipy, sacrebleu, rouge-score, nltk).

* ``classification_metrics``: GLUE's metric per task (Matthews for CoLA, accuracy + F1 for MRPC/QQP,
  Pearson + Spearman for STS-B, accuracy otherwise); accuracy + macro F1 for other data sets.
* ``generation_metrics``: the E2E NLG metrics. BLEU is sacrebleu's corpus BLEU (13a tokenisation),
  NIST is nltk's (n = 5, on 13a tokens), ROUGE-L is rouge-score's F-measure, best over references.
  METEOR (nltk) needs the WordNet corpus, which nltk cannot ship; CIDEr needs ``pycocoevalcap``.
  A metric that cannot run is listed in ``skipped`` with the reason instead of failing.
* ``exact_match``: final-answer accuracy for math (``The answer is: X`` / ``#### X`` / ``\\boxed{X}``), numbers
  compared by value and LaTeX answers as normalised strings (``peftlab.data.math.normalize_answer``).

Scales: generation scores as in the E2E / LoRA tables (BLEU, ROUGE-L and METEOR in [0, 100]; NIST and
CIDEr raw); classification metrics and ``exact_match`` are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .data.math import extract_answer, normalize_answer


@dataclass(frozen=True)
class GlueTask:
    """Columns, label count (1 = regression) and metrics of one GLUE task."""

    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("matthews_correlation",)),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",)),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
}
DEFAULT_METRICS = ("accuracy", "f1_macro")


def _metric_fns() -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "accuracy": accuracy_score,
        "f1": lambda y, p: f1_score(y, p),  # binary F1 of class 1, as GLUE reports it
        "f1_macro": lambda y, p: f1_score(y, p, average="macro"),
        "matthews_correlation": matthews_corrcoef,
        "pearson": lambda y, p: pearsonr(y, p)[0],
        "spearmanr": lambda y, p: spearmanr(y, p)[0],
    }


def classification_metrics(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray,
                           task: str | None = None) -> dict[str, float]:
    """Metrics for predictions against labels; ``task`` is a GLUE task name or ``None``.

    ``preds`` may be class ids, or logits of shape (n, num_classes) (arg-maxed; squeezed for STS-B).
    """
    if task is not None and task not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)} (or task=None).")
    names = GLUE_TASKS[task].metrics if task else DEFAULT_METRICS
    regression = task is not None and GLUE_TASKS[task].num_labels == 1
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim == 2:
        preds = preds[:, 0] if regression else preds.argmax(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels.")
    fns = _metric_fns()
    return {name: float(fns[name](labels, preds)) for name in names}


def trainer_compute_metrics(task: str | None = None) -> Callable:
    """A ``compute_metrics`` for ``transformers.Trainer``: ``EvalPrediction`` -> ``classification_metrics``."""

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred[0], eval_pred[1]
        logits = logits[0] if isinstance(logits, tuple) else logits
        return classification_metrics(logits, labels, task)

    return compute


def _meteor(hyp_tokens: list[list[str]], ref_tokens: list[list[list[str]]]) -> float | str:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")  # also finds corpora/wordnet.zip
    except LookupError:
        return ("nltk's METEOR needs the WordNet corpus, which is not installed and cannot be fetched "
                "offline (online: python -m nltk.downloader wordnet)")
    from nltk.translate.meteor_score import meteor_score

    # Sentence-level METEOR averaged over the corpus (nltk has no corpus-level METEOR).
    return 100 * float(np.mean([meteor_score(r, h) for h, r in zip(hyp_tokens, ref_tokens, strict=True)]))


def _cider(hyps: list[str], refs: list[list[str]]) -> float | str:
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return "CIDEr needs pycocoevalcap (pip install pycocoevalcap==1.2; its CIDEr is pure Python)"
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    return float(Cider().compute_score(gts, res)[0])


def reference_streams(references_list: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists → sacrebleu's reference streams (stream k holds every hypothesis's k-th
    reference, ``None`` where a hypothesis has fewer than k + 1)."""
    depth = max(map(len, references_list))
    return [[rs[k] if k < len(rs) else None for rs in references_list] for k in range(depth)]


def generation_metrics(hypotheses: Sequence[str], references_list: Sequence[Sequence[str]]) -> dict:
    """Corpus metrics of generated texts, each scored against one or more references.

    Returns ``bleu`` (0-100), ``nist``, ``rouge_l`` (0-100), ``meteor`` (0-100) and ``cider`` when they
    can run, and ``skipped``: ``{metric: reason}`` for those that cannot (e.g. METEOR without WordNet).
    """
    import sacrebleu
    from nltk.translate.nist_score import corpus_nist
    from rouge_score import rouge_scorer
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    hyps = [str(h).strip() for h in hypotheses]
    refs = [[str(r).strip() for r in rs] for rs in references_list]
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"Need one reference list per hypothesis; got {len(hyps)} and {len(refs)}.")
    if any(not rs for rs in refs):
        raise ValueError("Every hypothesis needs at least one reference.")
    result: dict = {"bleu": sacrebleu.corpus_bleu(hyps, reference_streams(refs)).score}

    tokenize = Tokenizer13a()
    hyp_tokens = [tokenize(h).split() for h in hyps]
    ref_tokens = [[tokenize(r).split() for r in rs] for rs in refs]
    # nltk divides by the hypotheses' n-gram count: orders no hypothesis reaches count as zero.
    order = min(5, max(map(len, hyp_tokens)))
    result["nist"] = float(corpus_nist(ref_tokens, hyp_tokens, n=order)) if order else 0.0

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    result["rouge_l"] = 100 * float(np.mean([scorer.score_multi(rs, h)["rougeL"].fmeasure
                                             for h, rs in zip(hyps, refs, strict=True)]))
    skipped = {}
    for name, value in (("meteor", _meteor(hyp_tokens, ref_tokens)), ("cider", _cider(hyps, refs))):
        if isinstance(value, str):
            skipped[name] = value
        else:
            result[name] = value
    result["skipped"] = skipped
    return result


def _answer(text: str) -> str:
    answer = extract_answer(text)
    return normalize_answer(answer) if answer is not None else str(text).strip().rstrip(".").casefold()


def exact_match(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions whose final answer equals the gold's.

    Final answers are read with ``extract_answer`` (``The answer is: X``, ``#### X``, ``\\boxed{X}``) and compared
    by ``normalize_answer``: ``$1,000.`` = ``1000.00`` = ``+1000``, ``3/4`` = ``0.75`` = ``\\frac{3}{4}``,
    ``\\left( 1, 2 \\right)`` = ``(1,2)``. A text without an answer marker is compared whole
    (case-insensitive, without a trailing period), e.g. ``Positive.`` = ``positive``.
    """
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"Need one prediction per gold answer; got {len(preds)} and {len(golds)}.")
    return float(np.mean([_answer(p) == _answer(g) for p, g in zip(preds, golds, strict=True)]))


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean token negative log-likelihood (natural log); ``inf`` on overflow."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
