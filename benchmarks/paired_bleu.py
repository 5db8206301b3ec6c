"""Paired comparison of two data-to-text runs on the same test MRs (peftlab.stats on sacrebleu's statistics).

    python benchmarks/paired_bleu.py BASELINE SYSTEM [--samples 2000]

BASELINE and SYSTEM are ``peftlab train --task data-to-text`` run folders (their ``test_items.jsonl`` holds each
test MR's BLEU statistics), or, for runs from before those were written, their ``predictions.jsonl`` (one line per
test meaning representation: ``mr``, ``hypothesis``, ``references``; scored here as written, without the
lower-casing WebNLG / DART runs apply). Corpus BLEU of each system with its 95 % percentile bootstrap interval over
the test MRs, and the difference SYSTEM − BASELINE with its paired bootstrap interval and the p-value of a paired
permutation test (:func:`peftlab.stats.paired_difference`, the approximate randomisation test). With a few dozen
test MRs the interval is wide: read it before reading a BLEU difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab import stats
from peftlab.metrics import bleu_statistics, reference_streams
from peftlab.recipes.test_items import item_key, read_items


def read_rows(path: Path) -> list[dict]:
    """The test MRs' rows (``key``, ``bleu_stats``) of a run folder or of a predictions.jsonl file."""
    if path.is_dir():
        items = read_items(path)
        if items is None or items.aggregate != "bleu":
            raise SystemExit(f"{path}: no BLEU test items (test_items.jsonl); pass a data-to-text run folder, or its "
                             "predictions.jsonl")
        return items.rows
    if not path.is_file():
        raise SystemExit(f"{path}: not a run folder or a file; pass a data-to-text run folder or its predictions.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no predictions")
    _, segments = bleu_statistics([r["hypothesis"] for r in rows], reference_streams([r["references"] for r in rows]))
    return [{"key": item_key(i, r["mr"]), "bleu_stats": s} for i, (r, s) in enumerate(zip(rows, segments, strict=True))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("system", type=Path)
    parser.add_argument("--samples", type=int, default=stats.RESAMPLES, help="bootstrap resamples and permutations")
    args = parser.parse_args()

    rows_a, rows_b = read_rows(args.baseline), read_rows(args.system)
    if [r["key"] for r in rows_a] != [r["key"] for r in rows_b]:
        raise SystemExit("the two runs do not hold the same test MRs in the same order; compare runs on one test set")
    a, b = stats.statistics("bleu", [rows_a]), stats.statistics("bleu", [rows_b])
    print(f"{len(rows_a)} test MRs, {args.samples} paired bootstrap resamples and permutations")
    for name, path, x in (("baseline", args.baseline, a), ("system", args.system, b)):
        interval = stats.bootstrap("bleu", x, resamples=args.samples, levels=("items",))
        print(f"{name:8s} BLEU {interval.estimate:6.2f}  95 % interval [{interval.low:6.2f}, {interval.high:6.2f}]  "
              f"{path}")
    diff = stats.paired_difference("bleu", a, b, resamples=args.samples)
    print(f"system − baseline: {diff.estimate:+.2f} BLEU, 95 % interval [{diff.low:+.2f}, {diff.high:+.2f}], "
          f"p = {diff.p_value:.4f}")


if __name__ == "__main__":
    main()
