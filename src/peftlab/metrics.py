"""Task metrics, computed with maintained libraries (scikit-learn, scipy, sacrebleu, rouge-score, nltk,
pycocoevalcap).

* ``classification_metrics``: GLUE's metric per task (Matthews for CoLA, accuracy + F1 for MRPC/QQP,
  Pearson + Spearman for STS-B, accuracy otherwise); accuracy + macro F1 for other data sets.
  ``metrics_by_group``: accuracy (and macro F1) per group of rows, e.g. per ``domain`` of a multi-domain set.
* ``generation_metrics``: the E2E / WebNLG / DART metrics, multi-reference. BLEU, TER and chrF are
  sacrebleu's (13a tokenisation), NIST is nltk's (n = 5, on 13a tokens), ROUGE-L is rouge-score's F-measure,
  best over references; METEOR and CIDEr are pycocoevalcap's (METEOR runs its jar: needs ``java``).
  A metric that cannot run is listed in ``skipped`` with the reason instead of failing.
* ``exact_match``: final-answer accuracy for math (``The answer is: X`` / ``#### X`` / ``\\boxed{X}``), numbers
  compared by value and LaTeX answers as normalised strings (``peftlab.data.math.normalize_answer``).

Scales: generation scores as in the E2E / LoRA tables (BLEU, ROUGE-L and METEOR in [0, 100]; NIST and
CIDEr raw); classification metrics and ``exact_match`` are fractions in [0, 1].
"""

from __future__ import annotations

import atexit
import functools
import math
import re
import shutil
import threading
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
    preds, labels = predictions(preds, labels, task)
    names = GLUE_TASKS[task].metrics if task else DEFAULT_METRICS
    fns = _metric_fns()
    return {name: float(fns[name](labels, preds)) for name in names}


def metrics_by_group(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray, groups: Sequence[str],
                     task: str | None = None, name: str = "domain") -> dict[str, dict[str, float]]:
    """Per group, the accuracy (and, for data without a GLUE task, the macro F1) of the rows of that group alone:
    ``{"accuracy_by_domain": {"amazon": …, "movie": …}, "f1_macro_by_domain": {…}}`` (groups sorted by name;
    ``name`` names the grouping). Computed as :func:`classification_metrics` computes the overall ones
    (scikit-learn); nothing for a regression task (STS-B)."""
    preds, labels = predictions(preds, labels, task)  # checks the task name first
    if task is not None and GLUE_TASKS[task].num_labels == 1:
        return {}
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels.")
    fns = _metric_fns()
    names = [n for n in ("accuracy", "f1_macro") if n == "accuracy" or task is None]
    return {f"{metric}_by_{name}": {str(g): float(fns[metric](labels[groups == g], preds[groups == g]))
                                    for g in sorted(set(groups.tolist()))} for metric in names}


def predictions(preds: Sequence | np.ndarray, labels: Sequence | np.ndarray,
                task: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class ids, or values for STS-B; labels) as :func:`classification_metrics` scores them."""
    if task is not None and task not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)} (or task=None).")
    regression = task is not None and GLUE_TASKS[task].num_labels == 1
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim == 2:
        preds = preds[:, 0] if regression else preds.argmax(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels.")
    return preds, labels


def trainer_compute_metrics(task: str | None = None, seen: dict[str, np.ndarray] | None = None) -> Callable:
    """A ``compute_metrics`` for ``transformers.Trainer``: ``EvalPrediction`` -> ``classification_metrics``.

    With ``seen``, each call also leaves there the ``predictions`` and ``labels`` it scored (see
    :func:`predictions`), so the last evaluation's per-item results can be written out.
    """

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred[0], eval_pred[1]
        logits = logits[0] if isinstance(logits, tuple) else logits
        if seen is not None:
            seen["predictions"], seen["labels"] = predictions(logits, labels, task)
        return classification_metrics(logits, labels, task)

    return compute


def lower_and_tokenize(text: str) -> str:
    """Lower-case, then split every non-word character off: the LoRA repository's ``gpt2_decode.py --tokenize
    --lower``, applied to hypotheses and references before its WebNLG / DART evaluation."""
    return " ".join(" ".join(re.split(r"(\W)", text.lower())).split())


_PYCOCOEVALCAP = "pycocoevalcap (pip install pycocoevalcap==1.2 pycocotools==2.0.11, as requirements.txt pins)"


def _one_line(text: str) -> str:
    """METEOR's jar reads one ``|||``-separated line per segment: no newlines, no ``|||`` inside a text."""
    return " ".join(text.replace("|||", " ").split())


@functools.cache
def _meteor_scorer():
    """pycocoevalcap's METEOR 1.5: a ``java -jar`` process kept for the session (its start, which loads the
    paraphrase tables, takes 5-15 s)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    atexit.register(_close_meteor, scorer)
    return scorer


def _close_meteor(scorer) -> None:
    """End the jar's process and close its pipes (pycocoevalcap's ``__del__`` leaves two open)."""
    process = scorer.meteor_p
    process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()


def _meteor(hyps: list[str], refs: list[list[str]]) -> float | str:
    if shutil.which("java") is None:
        return ("METEOR runs pycocoevalcap's meteor-1.5.jar and no `java` is on PATH "
                "(install a Java runtime, e.g. apt-get install default-jre-headless)")
    try:
        scorer = _meteor_scorer()
    except ImportError:
        return f"METEOR needs {_PYCOCOEVALCAP}"
    gts = {i: [_one_line(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [_one_line(h)] for i, h in enumerate(hyps)}
    try:
        if scorer.meteor_p.poll() is not None:
            raise OSError(f"exit code {scorer.meteor_p.returncode}")
        score = float(scorer.compute_score(gts, res)[0])
    except (OSError, ValueError) as e:  # the process died (e.g. java could not reserve -Xmx2G)
        _close_meteor(scorer)
        scorer.lock = threading.Lock()  # compute_score left its lock held; Meteor.__del__ takes it again
        _meteor_scorer.cache_clear()
        return f"METEOR's java process failed ({type(e).__name__}: {e})"
    return 100 * score


def _cider(hyp_tokens: list[list[str]], ref_tokens: list[list[list[str]]]) -> float | str:
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return f"CIDEr needs {_PYCOCOEVALCAP}"
    # CIDEr-D (n = 4, σ = 6), TF-IDF weights from the references of this corpus: one input scores 0.
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(ref_tokens)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyp_tokens)}
    return float(Cider().compute_score(gts, res)[0])


def reference_streams(references_list: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists → sacrebleu's reference streams (stream k holds every hypothesis's k-th
    reference, ``None`` where a hypothesis has fewer than k + 1)."""
    depth = max(map(len, references_list))
    return [[rs[k] if k < len(rs) else None for rs in references_list] for k in range(depth)]


def generation_metrics(hypotheses: Sequence[str], references_list: Sequence[Sequence[str]], *,
                       tokenize_lower: bool = False, segment_statistics: bool = False) -> dict:
    """Corpus metrics of generated texts, each scored against one or more references.

    Returns ``bleu``, ``ter``, ``chrf`` (sacrebleu, 0-100; TER case-sensitive, chrF with β = 2 and
    character n-grams up to 6), ``nist`` (nltk), ``rouge_l`` (rouge-score, best reference, 0-100),
    ``meteor`` (METEOR 1.5, 0-100) and ``cider`` (CIDEr-D), both from pycocoevalcap, and ``skipped``:
    ``{metric: reason}`` for those that cannot run (METEOR without ``java`` on PATH). With
    ``tokenize_lower`` every text first goes through ``lower_and_tokenize`` (the papers' WebNLG / DART
    evaluation); ``tokenize_lower`` is echoed in the result. With ``segment_statistics`` the result also holds
    ``bleu_statistics``: each hypothesis's BLEU statistics (:func:`bleu_statistics`). TER is the slow one
    (sacrebleu's shift search, per reference: ~20 ms an input for DART's many references on one CPU core).
    """
    from nltk.translate.nist_score import corpus_nist
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF, TER
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    prepare = lower_and_tokenize if tokenize_lower else str.strip
    hyps = [prepare(str(h)) for h in hypotheses]
    refs = [[prepare(str(r)) for r in rs] for rs in references_list]
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"Need one reference list per hypothesis; got {len(hyps)} and {len(refs)}.")
    if any(not rs for rs in refs):
        raise ValueError("Every hypothesis needs at least one reference.")
    streams = reference_streams(refs)
    # force: tokenised text is intended here, so sacrebleu's "forgot to detokenize?" warning is not
    bleu, segments = bleu_statistics(hyps, streams, force=tokenize_lower)
    result: dict = {"bleu": bleu,
                    "ter": TER(case_sensitive=True).corpus_score(hyps, streams).score,
                    "chrf": CHRF().corpus_score(hyps, streams).score}

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
    for name, value in (("meteor", _meteor(hyps, refs)), ("cider", _cider(hyp_tokens, ref_tokens))):
        if isinstance(value, str):
            skipped[name] = value
        else:
            result[name] = value
    result["tokenize_lower"] = tokenize_lower
    result["skipped"] = skipped
    if segment_statistics:
        result["bleu_statistics"] = segments
    return result


def bleu_statistics(hypotheses: Sequence[str], streams: Sequence[Sequence[str | None]],
                    force: bool = False) -> tuple[float, list[list[int]]]:
    """(corpus BLEU, per-hypothesis statistics): ``sacrebleu.corpus_bleu``'s own two steps, kept apart.

    Each hypothesis's statistics are sacrebleu's ``[hypothesis length, reference length, matches of n = 1…4,
    n-gram totals of n = 1…4]`` (13a tokens, closest reference length); corpus BLEU is the BLEU of their sum
    (``peftlab.stats`` recomputes it for resampled sets).
    """
    from sacrebleu.metrics import BLEU

    metric = BLEU(force=force)  # sacrebleu.corpus_bleu's defaults: 13a, exp smoothing
    segments = [[int(v) for v in s] for s in metric._extract_corpus_statistics(hypotheses, streams)]
    return metric._compute_score_from_stats(np.sum(segments, axis=0).tolist()).score, segments


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
    return float(np.mean(answer_matches(preds, golds)))


def answer_matches(preds: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """Per prediction: does its final answer equal the gold's (:func:`exact_match` is their mean)."""
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"Need one prediction per gold answer; got {len(preds)} and {len(golds)}.")
    return [_answer(p) == _answer(g) for p, g in zip(preds, golds, strict=True)]


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean token negative log-likelihood (natural log); ``inf`` on overflow."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
