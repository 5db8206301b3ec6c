"""Write the generated E2E stand-in (``e2e-synthetic``) as WebNLG and DART JSON files: a triples-format stand-in.

No package ships WebNLG or DART, so docs/benchmarks.md's WebNLG/DART-format row trains on these files: each
E2E meaning representation ``name[The Eagle], eatType[pub], near[Café Rouge]`` becomes the triples
``(The Eagle, eatType, pub), (The Eagle, near, Café Rouge)`` with all its references, in the layouts of the
LoRA repository's ``webnlg_challenge_2017/*.json`` and ``dart/dart-v1.1.1-full-*.json``
(``peftlab.data.triples`` reads them back; ``peftlab train --task data-to-text --data FILE.json``).

    .venv/bin/python benchmarks/e2e_as_triples.py --out-dir data/triples [--mrs 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peftlab import files
from peftlab.data import generate_e2e, group_references, parse_mr


def triples(mr: str) -> list[tuple[str, str, str]]:
    slots = dict(parse_mr(mr))
    name = slots.pop("name")
    return [(name, slot, value) for slot, value in slots.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--mrs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grouped = group_references(generate_e2e(args.mrs, args.seed))
    grouped = dict(zip(grouped["mr"], grouped["references"], strict=True))
    webnlg = {"entries": [
        {str(i + 1): {"category": "Restaurant",
                      "modifiedtripleset": [{"subject": s, "property": p, "object": o} for s, p, o in triples(mr)],
                      "lexicalisations": [{"lex": ref, "comment": "good"} for ref in refs]}}
        for i, (mr, refs) in enumerate(grouped.items())]}
    dart = [{"tripleset": [list(t) for t in triples(mr)],
             "annotations": [{"source": "e2e-synthetic", "text": ref} for ref in refs]}
            for mr, refs in grouped.items()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(args.out_dir / "webnlg-standin.json", webnlg)
    files.atomic_write_json(args.out_dir / "dart-standin.json", dart)
    print(f"wrote {len(grouped)} inputs to {args.out_dir}/webnlg-standin.json and dart-standin.json")


if __name__ == "__main__":
    main()
