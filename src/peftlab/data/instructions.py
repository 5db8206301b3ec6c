"""Instruction data for causal-LM tuning: generators, a task mixture, file readers.

Records are ``{instruction, input, output}`` (Alpaca layout). Math answers end with
``The answer is: X`` (MetaMathQA's convention) or ``#### X`` (GSM8K's); ``peftlab.data.math`` extracts
and normalises them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets as hf

from .cache import DataError
from .datasets import label_names, load_dataset, read_json_records
from .math import ANSWER_PREFIX, GSM8K_PREFIX, MATH_FORMATS, MathFormat

_FEATURES = hf.Features({c: hf.Value("string") for c in ("instruction", "input", "output")})


_NAMES = ("Tom", "Maria", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Jack", "Sofia", "Diego")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells")


def _math_problem(rng: random.Random) -> tuple[str, str, int]:
    """One word problem: (question, worked solution, answer)."""
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    kind = rng.randrange(5)
    if kind == 0:
        return (f"{name} has {a} {items}. {name} gets {b} more. How many {items} does {name} have now?",
                f"{name} has {a} + {b} = {a + b} {items}.", a + b)
    if kind == 1:
        a += b
        return (f"{name} had {a} {items} and gave {b} of them away. How many {items} are left?",
                f"{name} has {a} - {b} = {a - b} {items} left.", a - b)
    if kind == 2:
        a = rng.randint(2, 12)
        return (f"{name} buys {a} boxes with {b} {items} in each box. How many {items} is that in total?",
                f"That is {a} * {b} = {a * b} {items}.", a * b)
    if kind == 3:
        a = rng.randint(2, 12)
        return (f"{name} shares {a * b} {items} equally among {a} friends. How many {items} does each "
                f"friend get?", f"Each friend gets {a * b} / {a} = {b} {items}.", b)
    wage, hours = rng.randint(5, 25), rng.randint(2, 8)
    spent = rng.randint(1, wage * hours - 1)
    return (f"{name} earns ${wage} per hour and works {hours} hours, then spends ${spent}. How many dollars "
            f"does {name} have left?",
            f"{name} earns {wage} * {hours} = {wage * hours} dollars and has {wage * hours} - {spent} = "
            f"{wage * hours - spent} dollars left.", wage * hours - spent)


def generate_arithmetic(n: int, seed: int = 0) -> hf.Dataset:
    """``n`` arithmetic word problems; ``output`` is a worked solution ending ``The answer is: X``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, solution, answer = _math_problem(rng)
        rows.append({"instruction": question, "input": "", "output": f"{solution}\n{ANSWER_PREFIX}{answer}"})
    return hf.Dataset.from_list(rows, features=_FEATURES)


GSM_SYMBOLIC_SUFFIX = " Give the result as your final answer. Do not include units."  # reasoning-gym adds it


def _reasoning_gym(name: str):
    try:
        import reasoning_gym
    except ImportError as e:
        raise DataError(f"{name} needs reasoning-gym ({e}); install it with "
                        "pip install --no-deps -r requirements-assets.txt") from None
    return reasoning_gym


def _gsm_record(entry: dict) -> tuple[str, str]:
    """(question without reasoning-gym's suffix, worked solution ending ``#### N``) of one gsm_symbolic item."""
    question = entry["question"].removesuffix(GSM_SYMBOLIC_SUFFIX)
    worked = entry["metadata"]["answer_cot"].rsplit("####", 1)[0].rstrip()  # its "#### N" may read 8.0
    return question, f"{worked}\n{GSM8K_PREFIX}{entry['answer']}"


def _rows(problems: dict[str, str]) -> hf.Dataset:
    rows = [{"instruction": q, "input": "", "output": out} for q, out in problems.items()]
    return hf.Dataset.from_list(rows, features=_FEATURES)


def generate_gsm_symbolic(n: int, seed: int = 0) -> hf.Dataset:
    """``n`` distinct GSM8K-template word problems from reasoning-gym's ``gsm_symbolic`` generator (Apache-2.0).

    ``instruction`` is the question (without reasoning-gym's "Give the result as your final answer" suffix, so
    that it reads like GSM8K); ``output`` is the template's worked solution ending ``#### N``. The same
    ``(n, seed)`` always gives the same rows (reasoning-gym seeds item ``i`` with ``seed + i``); a repeated
    question is skipped. Generation takes ~0.1 ms a row, so nothing is cached.
    """
    reasoning_gym = _reasoning_gym("gsm-symbolic")
    problems: dict[str, str] = {}  # question -> worked solution, in generation order
    size = n + n // 10 + 8  # a few spare items for repeated questions
    while len(problems) < n:  # items are prefix-stable, so a larger size only appends items
        problems = {}
        for entry in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed):
            question, solution = _gsm_record(entry)
            problems.setdefault(question, solution)
            if len(problems) == n:
                break
        size *= 2
    return _rows(problems)


# The easiest gsm_symbolic templates (reasoning-gym's generator numbers): a two-line worked solution of integer
# arithmetic on numbers below ~300 (e.g. 43: "His cousin has 9 - 3 = 6 toys. Together, they have 9 + 6 = 15 toys.").
GSM_EASY_TEMPLATES = (6, 10, 16, 20, 24, 39, 43, 54, 55, 72)


def generate_gsm_easy(n: int, seed: int = 0) -> hf.Dataset:
    """``n`` distinct problems from the ``GSM_EASY_TEMPLATES`` of reasoning-gym's ``gsm_symbolic``, in turn
    (template ``GSM_EASY_TEMPLATES[i % 10]`` for item ``i``, so every template has n/10 rows); rows as in
    ``generate_gsm_symbolic``. Item ``i`` is drawn with ``random.Random(f"{seed}-{i}")``, so the same
    ``(n, seed)`` always gives the same rows; a repeated question is skipped (no question is in two splits).
    """
    generators = _reasoning_gym("gsm-easy").create_dataset("gsm_symbolic", size=1, seed=seed).generators
    problems: dict[str, str] = {}
    for i in range(100 * n + 1000):
        if len(problems) == n:
            break
        template = GSM_EASY_TEMPLATES[i % len(GSM_EASY_TEMPLATES)]
        entry = generators[template](random.Random(f"{seed}-{i}"), 1.0)
        question, solution = _gsm_record(entry)
        problems.setdefault(question, solution)
    if len(problems) < n:
        raise DataError(f"gsm-easy: only {len(problems)} distinct problems in {100 * n + 1000} draws; ask for fewer.")
    return _rows(problems)


SENTIMENT_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."


def generate_sentiment_instructions(n: int, seed: int = 0, split: str = "train") -> hf.Dataset:
    """``n`` movie snippets (from the ``movie-snippets`` ``split``) labelled ``positive``/``negative``."""
    data = load_dataset("movie-snippets")[split]
    names = label_names(data)
    if n > len(data):
        raise DataError(f"Asked for {n} sentiment examples; the {split!r} split has {len(data)}.")
    picked = data.shuffle(seed=seed).select(range(n))
    rows = [{"instruction": SENTIMENT_INSTRUCTION, "input": r["text"], "output": names[r["label"]]}
            for r in picked]
    return hf.Dataset.from_list(rows, features=_FEATURES)


_WORDS = ("river", "apple", "stone", "cloud", "garden", "yellow", "window", "tiger", "silver", "bread",
          "candle", "forest", "music", "orange", "pillow", "rocket", "summer", "violin", "winter", "zebra")
_FORMATS: dict[str, tuple[str, Callable[[list[str]], list[str]]]] = {
    "reverse": ("Reverse the order of these words.", lambda w: w[::-1]),
    "uppercase": ("Write these words in upper case.", lambda w: [x.upper() for x in w]),
    "sort": ("Sort these words alphabetically.", sorted),
}


def generate_format_tasks(n: int, seed: int = 0) -> hf.Dataset:
    """``n`` copy/format tasks on word lists: reverse, upper-case or sort 3-6 words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(_WORDS, rng.randint(3, 6))
        instruction, transform = _FORMATS[rng.choice(sorted(_FORMATS))]
        rows.append({"instruction": instruction, "input": " ".join(words), "output": " ".join(transform(words))})
    return hf.Dataset.from_list(rows, features=_FEATURES)


INSTRUCTION_TASKS: dict[str, Callable[[int, int], hf.Dataset]] = {
    "arithmetic": generate_arithmetic,
    "sentiment": generate_sentiment_instructions,
    "format": generate_format_tasks,
    "gsm-symbolic": generate_gsm_symbolic,
    "gsm-easy": generate_gsm_easy,
}


def instruction_mixture(
    n_per_task: int, seed: int = 0, tasks: Sequence[str] = ("arithmetic", "sentiment", "format")
) -> hf.Dataset:
    """``n_per_task`` examples of each task, with a ``task`` column, shuffled with ``seed``."""
    unknown = [t for t in tasks if t not in INSTRUCTION_TASKS]
    if unknown:
        raise DataError(f"Unknown instruction task(s) {unknown}; known: {', '.join(INSTRUCTION_TASKS)}.")
    parts = [INSTRUCTION_TASKS[t](n_per_task, seed).add_column("task", [t] * n_per_task) for t in tasks]
    return hf.concatenate_datasets(parts).shuffle(seed=seed)


INSTRUCTION_COLUMNS = ("instruction", "output")  # the Alpaca layout; "input" is optional


def file_format(keys: set[str] | list[str], source: str | Path = "data") -> MathFormat | None:
    """The layout that records with columns ``keys`` are in: ``None`` for Alpaca, else the math format.

    The one place that decides a file's format from its columns (Alpaca first, then ``MATH_FORMATS`` in order).
    """
    keys = set(keys)
    if keys.issuperset(INSTRUCTION_COLUMNS):
        return None
    for fmt in MATH_FORMATS:
        if keys.issuperset((fmt.question, fmt.solution)):
            return fmt
    known = ", ".join(f"{{{f.question}, {f.solution}}} ({f.name})" for f in MATH_FORMATS)
    raise DataError(f"{source}: records have keys {sorted(keys)}; expected {{instruction, input, output}}, {known}.")


def _which_records(numbers: list[int], total: int) -> str:
    """``any of the 3 records`` / ``record 2 (of 10)`` / ``records 1, 2, 3, 4, 5 and 3 more (of 10)``."""
    if len(numbers) == total:
        return f"any of the {total} records" if total > 1 else "the record"
    shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    return f"record{'s' if len(numbers) > 1 else ''} {shown} (of {total})"


def read_instructions(path: str | Path) -> hf.Dataset:
    """Read a JSON/JSONL instruction file into ``{instruction, input, output}`` records.

    Accepted layouts (``file_format`` decides by the columns): Alpaca ``{instruction, input?, output}``, and the
    math sets MetaMathQA ``{query, response}``, GSM8K ``{question, answer}`` and MATH ``{problem, solution}``;
    the worked solution becomes ``output`` unchanged. In a math file every solution must hold its final answer
    (``The answer is: N``, ``#### N``, ``\\boxed{...}``), else a ``DataError`` names the records without one.
    """
    records = read_json_records(path)
    fmt = file_format(records[0], path)
    columns = INSTRUCTION_COLUMNS if fmt is None else (fmt.question, fmt.solution)
    lacking = next((c for r in records for c in columns if c not in r), None)
    if lacking is not None:
        raise DataError(f"{path}: a record lacks the key {lacking!r} that the first record has.")
    if fmt is None:
        rows = [(r["instruction"], r.get("input") or "", r["output"]) for r in records]
    else:
        rows = [(r[fmt.question], "", r[fmt.solution]) for r in records]
    rows = [dict(zip(_FEATURES, map(str, row), strict=True)) for row in rows]
    if fmt is not None:
        unanswered = [i for i, row in enumerate(rows, 1) if fmt.extract(row["output"]) is None]
        if unanswered:
            raise DataError(f"{path}: no final answer in {fmt.solution!r} of {_which_records(unanswered, len(rows))}; "
                            f"a {fmt.name} file needs {fmt.answer_form} in every solution.")
    return hf.Dataset.from_list(rows, features=_FEATURES)
