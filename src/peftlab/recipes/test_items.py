"""Per-item test scores: the ``test_items.jsonl`` a run writes next to its ``metrics.json``.

One JSON row per test item, in the test split's order, each with a ``key`` (the item's position and a hash of its
content, so two runs on the same test split pair item by item and runs on different splits do not) and what the
run's main test metric needs of that item, in the form :mod:`peftlab.stats` sums (``aggregate``):

* ``mean``: ``value``, the item's score (correct 0/1, exact match 0/1, a sample's image score);
* ``bleu``: ``bleu_stats``, sacrebleu's sentence statistics (corpus BLEU is recomputed from their sum);
* ``macro_mean``: ``value`` and ``group`` (MMLU: correct and subject; the metric is the mean over subjects);
* ``matthews`` / ``pearson``: ``label`` and ``prediction``.

``metrics.json`` names the file and its aggregate under ``test_items``; the metric recomputed from all rows equals
the test metric in ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab import files

ITEMS_FILE = "test_items.jsonl"
ITEMS = "_items"  # the entry of a recipe's ``evaluate`` result that holds its ItemScores (taken off before printing)


@dataclass
class ItemScores:
    """The per-item rows of one test evaluation and how :mod:`peftlab.stats` aggregates them."""

    aggregate: str
    rows: list[dict[str, Any]]

    @property
    def keys(self) -> list[str]:
        return [row["key"] for row in self.rows]


def item_key(index: int, *content: Any) -> str:
    """``"00012-3f9a0c2b51de"``: the item's position and the first 12 hex digits of the SHA-256 of its content."""
    digest = hashlib.sha256(json.dumps(content, ensure_ascii=False, default=str).encode()).hexdigest()[:12]
    return f"{index:05d}-{digest}"


def write_items(path: str | os.PathLike, items: ItemScores) -> dict[str, Any]:
    """Write the rows atomically; return the ``test_items`` entry of ``metrics.json`` (file name, aggregate, count)."""
    path = files.atomic_write_jsonl(path, items.rows)
    return {"file": path.name, "aggregate": items.aggregate, "num_items": len(items.rows)}


def read_items(folder: str | os.PathLike, metrics: dict[str, Any] | None = None) -> ItemScores | None:
    """The item scores of a run folder, or ``None`` when it has none (a run from before they were written)."""
    folder = Path(folder)
    if metrics is None:
        path = folder / "metrics.json"
        metrics = files.read_json(path) if path.is_file() else {}
    entry = metrics.get("test_items")
    if not entry or not (folder / entry["file"]).is_file():
        return None
    lines = (folder / entry["file"]).read_text(encoding="utf-8").splitlines()
    return ItemScores(entry["aggregate"], [json.loads(line) for line in lines if line.strip()])
