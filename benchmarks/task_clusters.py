"""Which clusters does ``estimate_num_heads`` find in an instruction mixture, and do they follow the tasks?

    python benchmarks/task_clusters.py [--data mixture] [--max-heads 8] [--method kmeans]

Loads the causal-LM recipe's training split of ``--data`` (a named mixture or a .json/.jsonl file whose
records carry a ``task`` field), builds the prompts exactly as ``peftlab train --task causal-lm
--method hydralora --num-heads auto`` does, runs ``peftlab.estimate_num_heads`` on them and prints
N and a task × cluster table of example counts. A cluster that holds several tasks means the heads cannot
split by task; a task spread over clusters means it has sub-populations (templates, sub-tasks).
"""

from __future__ import annotations

import argparse
from collections import Counter

from _harness import markdown_table

from peftlab.data.clusters import estimate_num_heads
from peftlab.recipes.text.causal_lm import load_records, record_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mixture")
    parser.add_argument("--max-heads", type=int, default=8)
    parser.add_argument("--method", choices=("kmeans", "dbscan"), default="kmeans")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train = load_records(args.data)["train"]
    if "task" not in train.column_names:
        raise SystemExit(f"{args.data}: the records carry no `task` field to compare the clusters with")
    texts = [record_prompt(row) for row in train]
    n, labels = estimate_num_heads(texts, max_heads=args.max_heads, method=args.method, seed=args.seed)
    clusters = sorted(set(int(c) for c in labels))
    counts = Counter(zip(train["task"], (int(c) for c in labels), strict=True))
    print(f"{args.data}: {len(texts)} training prompts, estimate_num_heads ({args.method}) -> N = {n}\n")
    header = ["task", *(f"cluster {c}" for c in clusters)]
    rows = [[task, *(str(counts.get((task, c), 0)) for c in clusters)] for task in sorted(set(train["task"]))]
    print("\n".join(markdown_table(header, rows, right=set(range(1, len(header))))))


if __name__ == "__main__":
    main()
