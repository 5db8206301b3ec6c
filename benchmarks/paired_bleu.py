"""Paired bootstrap test of two data-to-text runs on the same test MRs (sacrebleu's implementation).

    python benchmarks/paired_bleu.py BASELINE/predictions.jsonl SYSTEM/predictions.jsonl [--samples 1000]

Each file is the ``predictions.jsonl`` a ``peftlab train --task data-to-text`` run writes (one line per test
meaning representation: ``mr``, ``hypothesis``, ``references``). sacrebleu resamples the test set with
replacement ``--samples`` times and reports, for BLEU, each system's mean and 95 % confidence interval and
the p-value of the difference (Koehn 2004). With a few dozen test MRs the interval is wide: read it before
reading a BLEU difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

from peftlab.metrics import reference_streams


def read_predictions(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """Return (mrs, hypotheses, references) from a predictions.jsonl file."""
    if not path.is_file():
        raise SystemExit(f"{path}: not a file; pass the predictions.jsonl inside a data-to-text run folder")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no predictions")
    return [r["mr"] for r in rows], [r["hypothesis"] for r in rows], [r["references"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("system", type=Path)
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = parser.parse_args()

    mrs_a, hyps_a, refs = read_predictions(args.baseline)
    mrs_b, hyps_b, _ = read_predictions(args.system)
    if mrs_a != mrs_b:
        raise SystemExit("the two files do not hold the same test MRs in the same order; compare runs on one test set")
    test = PairedTest([("baseline", hyps_a), ("system", hyps_b)], {"BLEU": BLEU()}, reference_streams(refs),
                      test_type="bs", n_samples=args.samples)
    _, scores = test()
    print(f"{len(hyps_a)} test MRs, {args.samples} paired bootstrap samples")
    for name, path, result in zip(("baseline", "system"), (args.baseline, args.system), scores["BLEU"], strict=True):
        print(f"{name:8s} BLEU {result.score:6.2f}  (bootstrap mean {result.mean:6.2f} ± {result.ci:.2f}, "
              f"p = {'—' if result.p_value is None else f'{result.p_value:.3f}'})  {path}")


if __name__ == "__main__":
    main()
