"""Instruction data for causal-LM tuning: generators, a task mixture, file readers, answer extraction.

Records are ``{instruction, input, output}`` (Alpaca layout). Math answers end with
``The answer is: X`` (MetaMathQA's convention); ``extract_answer`` also reads GSM8K's ``#### X``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets as hf

from .cache import DataError
from .datasets import label_names, load_dataset, read_json_records

ANSWER_PREFIX = "The answer is: "
_ANSWER = re.compile(r"the answer is:?|####", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FEATURES = hf.Features({c: hf.Value("string") for c in ("instruction", "input", "output")})


def _normalize(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip().replace("$", "")
    answer = re.sub(r"(?<=\d),(?=\d{3})", "", answer).strip()
    if _NUMBER.fullmatch(answer) and "." in answer:  # 18.00 -> 18, 2.50 -> 2.5
        answer = answer.rstrip("0").rstrip(".")
    return answer


def extract_answer(text: str | None) -> str | None:
    """The final answer in ``text``: after the last ``The answer is:`` or ``####``; else a bare number.

    Commas in numbers, ``$`` and a trailing period are removed (``"#### $1,000."`` -> ``"1000"``).
    Returns ``None`` when there is no answer marker and the text is not a single number.
    """
    if not text:
        return None
    markers = list(_ANSWER.finditer(text))
    if markers:
        return _normalize(text[markers[-1].end():].split("\n", 1)[0]) or None
    bare = _normalize(text)
    return bare if _NUMBER.fullmatch(bare) else None


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


_SCHEMAS = (  # (keys that identify the layout, mapping to instruction/input/output)
    (("instruction", "output"), lambda r: (r["instruction"], r.get("input") or "", r["output"])),
    (("query", "response"), lambda r: (r["query"], "", r["response"])),  # MetaMathQA
    (("question", "answer"), lambda r: (r["question"], "", r["answer"])),  # GSM8K: answer ends "#### X"
)


def read_instructions(path: str | Path) -> hf.Dataset:
    """Read a JSON/JSONL instruction file into ``{instruction, input, output}`` records.

    Accepted layouts: Alpaca ``{instruction, input?, output}``, MetaMathQA ``{query, response}`` and
    GSM8K ``{question, answer}`` (the answer keeps its ``#### X`` line; ``extract_answer`` reads it).
    """
    records = read_json_records(path)
    keys = set(records[0])
    convert = next((c for needed, c in _SCHEMAS if keys.issuperset(needed)), None)
    if convert is None:
        raise DataError(
            f"{path}: records have keys {sorted(keys)}; expected {{instruction, input, output}}, "
            "{query, response} (MetaMathQA) or {question, answer} (GSM8K)."
        )
    try:
        rows = [dict(zip(("instruction", "input", "output"), map(str, convert(r)), strict=True)) for r in records]
    except KeyError as e:
        raise DataError(f"{path}: a record lacks the key {e.args[0]!r} that the first record has.") from None
    return hf.Dataset.from_list(rows, features=_FEATURES)
