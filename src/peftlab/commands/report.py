"""``peftlab report DIR...``: one self-contained HTML page per run, comparison or analysis folder.

What a folder is follows from its files:

- a ``peftlab compare`` folder: ``compare.json`` (with ``compare.png``; ``trials.csv`` / ``trials.png`` of a
  tuning); its runs (``<method>/seed-<seed>/``, or the ``folder`` each run of ``compare.json`` names) are
  sections of the same page, which the comparison's tables link to;
- a ``peftlab analyze`` folder: ``analysis.json`` and ``analysis.png``;
- a ``peftlab train`` run folder: ``metrics.json`` and what lies beside it (:mod:`peftlab.commands.report_run`).

A page shows the options (task, model, method, budget), the test metrics (before and after training where the
run measured both), the evaluations logged during training, the training curve, image grids and other figures,
the comparison's tables and plot (any further per-method columns and parts of ``compare.json``, such as
intervals, paired differences or a tuning's choices, are shown as they are), the trials of a tuning, and the
numbers of an analysis (:mod:`peftlab.commands.report_page`).

Every page is built before any is written: a folder that is none of these, or whose ``metrics.json`` /
``compare.json`` / ``analysis.json`` is missing or invalid JSON, raises :class:`~peftlab.errors.ReportError` and
nothing is written. So does NaN / Infinity in ``metrics.json`` or ``analysis.json`` (peftlab writes neither there);
in ``compare.json``, where ``peftlab compare`` writes a diverged run's NaN, it is shown, with a warning. An image
that cannot be read inside an otherwise good folder is shown as missing, with a warning on the page and in the
returned lines. Pages are written atomically: ``DIR/report.html``, or ``out`` for a single folder.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from peftlab import files
from peftlab.commands.report_page import Cell, Section, Table, anchor, cell, render
from peftlab.commands.report_run import FOLD_ROWS, figure, read_optional, read_result, run_section
from peftlab.errors import ReportError

REPORT_FILE = "report.html"
WHAT = ("give a run folder of peftlab train (metrics.json), a comparison folder of peftlab compare (compare.json) "
        "or an analysis folder of peftlab analyze (analysis.json)")
ROW_KEYS = ("method", "lr", "mean", "std", "seeds", "trainable_params", "trainable_percent", "seconds_per_step",
            "peak_memory_mb")  # compare.json's per-method columns; the others are shown after these


def report(folders: list[str | os.PathLike], out: str | os.PathLike | None = None, spectrum: bool = False) -> list[str]:
    """Write one HTML page per folder (``<folder>/report.html``, or ``out`` for a single folder); return the lines
    to print: one per page written, and the warnings (unreadable images). ``spectrum``: each run's adapter is loaded
    on its base model for the spectral change of its layers (:func:`~peftlab.commands.report_run.add_spectrum`)."""
    if not folders:
        raise ReportError(f"no folder given; {WHAT}")
    if out is not None and len(folders) != 1:
        raise ReportError(f"--out names one file but {len(folders)} folders were given; give one folder with --out, "
                          f"or leave --out out to write {REPORT_FILE} into each folder")
    if out is not None and Path(out).is_dir():
        raise ReportError(f"--out {out} is a folder; give a file name such as {Path(out) / REPORT_FILE}")
    pages = []
    for folder in map(Path, folders):
        section = folder_section(folder, spectrum)
        pages.append((Path(out) if out is not None else folder / REPORT_FILE, section, folder))
    lines = []
    for path, section, folder in pages:
        html = render(section, f"{section.title} — {section.kind}", str(folder)).encode("utf-8")
        files.atomic_write_bytes(path, html)
        lines += [f"warning: {w}" for s in (section, *section.children) for w in s.warnings]
        lines.append(f"wrote {path} ({len(html) / 1024:.0f} KiB)")
    return lines


def folder_section(folder: Path, spectrum: bool = False) -> Section:
    """The section of a comparison, analysis or run folder, told apart by their files (module docstring)."""
    if not folder.is_dir():
        raise ReportError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}; {WHAT}")
    run = read_optional(folder / "run_config.json")
    kind = run.get("kind") if isinstance(run, dict) else None
    title = folder.resolve().name
    if (folder / "compare.json").is_file() or kind == "compare":
        return compare_section(folder, title, spectrum)
    if (folder / "analysis.json").is_file():
        return analysis_section(folder, title)
    if (folder / "metrics.json").is_file() or kind == "train":
        return run_section(folder, title, anchor("run", title), spectrum)
    raise ReportError(f"{folder} holds no metrics.json, compare.json or analysis.json; {WHAT}")


# -- a comparison ----------------------------------------------------------------------------------------------------
def compare_section(folder: Path, title: str, spectrum: bool = False) -> Section:
    """A ``peftlab compare`` folder: its tables, plot, trials, and a section per run (linked from the tables)."""
    section = Section(anchor("compare", title), title, "peftlab compare")
    result = read_result(folder / "compare.json", "the comparison has not finished or is damaged: wait for peftlab "
                         "compare to finish, or rerun it with --overwrite", section)
    rows, runs, metric = result.get("rows"), result.get("runs", []), result.get("metric", "metric")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows) or not isinstance(
            runs, list):
        raise ReportError(f"{folder / 'compare.json'} has no list of per-method rows; the file is damaged or not "
                          "written by peftlab compare; rerun peftlab compare with --overwrite")
    budget = result.get("budget") if isinstance(result.get("budget"), dict) else {}
    section.facts = [(k.replace("_", " "), cell(v)) for k, v in budget.items() if v is not None]
    section.facts.append(("main metric", cell(metric)))
    entries = {f"{e.get('method')}/seed-{e.get('seed')}": e for e in runs if isinstance(e, dict)}
    children: dict[str, Section] = {}
    for name, entry in entries.items():  # each run's folder: its "folder", else compare's <method>/seed-<seed>
        default = Path(re.sub(r"[^\w.-]+", "_", str(entry.get("method")))) / f"seed-{entry.get('seed')}"
        path = folder / (entry["folder"] if isinstance(entry.get("folder"), str) else default)
        if (path / "metrics.json").is_file() and path.resolve().is_relative_to(folder.resolve()):
            children[name] = run_section(path, name, anchor("run", name), spectrum)
        else:
            section.warnings.append(f"the run folder {path} of {name} is missing; its section is left out")
    section.children = list(children.values())
    first = {}  # method -> the anchor of its first run's section
    for name, child in children.items():
        first.setdefault(name.rsplit("/seed-", 1)[0], child.anchor)
    section.tables.append(method_table(rows, metric, first))
    others = list(dict.fromkeys(k for r in rows for k in (r.get("other_metrics") or {})))
    if others:
        section.tables.append(Table("Other test metrics (mean ± std over seeds)", ["method", *others], [
            [Cell(str(r["method"]), link=first.get(str(r["method"]))),
             *(mean_std(*pair) if isinstance(pair := (r.get("other_metrics") or {}).get(k), list) and len(pair) == 2
               else cell(pair) for k in others)] for r in rows]))
    section.tables.append(Table("Runs", ["run", "lr", f"test {metric}", "trainable params", "s/step"], [
        [Cell(name, link=children[name].anchor if name in children else None), cell(e.get("lr")),
         cell(e.get("value")), cell(e.get("trainable_params")), cell(e.get("seconds_per_step"))]
        for name, e in entries.items()], folded=len(entries) > FOLD_ROWS))
    if trials := trials_table(folder / "trials.csv", section):
        section.tables.append(trials)
    section.tables += further_tables(result, section)
    known = {"compare.png": f"test {metric} vs trainable parameters", "trials.png": "Trials"}
    others = [(path.name, path.name) for path in sorted(folder.glob("*.png")) if path.name not in known]
    for name, caption in [*known.items(), *others]:
        if found := figure(folder / name, caption, section):
            section.figures.append(found)
    return section


def further_tables(result: dict[str, Any], section: Section) -> list[Table]:
    """What else ``compare.json`` holds (a tuning's chosen settings, paired differences, ...), shown as it is: a
    mapping of mappings or a ``rows`` list as a table (its other entries as the table's note), a value as a fact."""
    tables = []
    for key, value in result.items():
        if key in ("budget", "metric", "rows", "runs") or value is None:
            continue
        title = key.replace("_", " ").capitalize()
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(dict.fromkeys(k for v in value.values() for k in v))
            tables.append(Table(title, ["", *columns], [[Cell(str(name)), *(cell(v.get(k)) for k in columns)]
                                                        for name, v in value.items()]))
        elif isinstance(value, dict) and isinstance(value.get("rows"), list):
            rows = [r for r in value["rows"] if isinstance(r, dict)]
            columns = sorted(dict.fromkeys(k for r in rows for k in r), key=lambda k: k != "method")  # method first
            note = "; ".join(f"{k}: {cell(v).text}" for k, v in value.items() if k != "rows" and v is not None)
            tables.append(Table(title, columns, [[cell(r.get(k)) for k in columns] for r in rows], note=note))
        elif isinstance(value, dict):
            tables.append(Table(title, ["", "value"], [[Cell(str(k)), cell(v)] for k, v in value.items()]))
        else:
            section.facts.append((key.replace("_", " "), cell(value)))
    return tables


def mean_std(mean: Any, std: Any) -> Cell:
    if mean is None:
        return cell(None)
    return Cell(f"{cell(mean).text} ± {cell(std).text}", f"{mean!r} ± {std!r}")


def method_table(rows: list[dict[str, Any]], metric: str, first: dict[str, str]) -> Table:
    """compare.json's per-method rows: the known columns, then any other key (intervals, ...) as it is."""
    extra = [k for k in dict.fromkeys(k for r in rows for k in r)
             if k not in ROW_KEYS and k not in ("other_metrics", "peak_memory_kind")]
    cuda = str(rows[0].get("peak_memory_kind", "")).startswith("cuda") if rows else False
    columns = ["method", "lr", f"test {metric} (mean ± std)", "seeds", "trainable params", "trainable %", "s/step",
               "peak GPU memory (MB)" if cuda else "peak RSS (MB)", *(k.replace("_", " ") for k in extra)]
    body = [[Cell(str(r["method"]), link=first.get(str(r["method"]))), cell(r.get("lr")),
             mean_std(r.get("mean"), r.get("std")), cell(r.get("seeds")), cell(r.get("trainable_params")),
             cell(r.get("trainable_percent")), cell(r.get("seconds_per_step")), cell(r.get("peak_memory_mb")),
             *(cell(r.get(k)) for k in extra)] for r in rows]
    return Table("Comparison", columns, body)


def trials_table(path: Path, section: Section) -> Table | None:
    """``trials.csv`` of ``compare --tune``, every column as it is (numbers formatted)."""
    if not path.is_file():
        return None
    try:
        records = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (UnicodeDecodeError, csv.Error) as err:
        section.warnings.append(f"{path} is not a readable CSV file ({err}); the trials table is left out")
        return None
    if not records:
        return None
    return Table("Trials (trials.csv)", records[0], [[cell(number(v)) for v in r] for r in records[1:]],
                 folded=len(records) > FOLD_ROWS + 1)


def number(text: str) -> Any:
    """``"3"`` → 3, ``"0.25"`` → 0.25, anything else stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- an analysis -----------------------------------------------------------------------------------------------------
def analysis_section(folder: Path, title: str) -> Section:
    """A ``peftlab analyze`` folder: the runs and groups, the distances (or HRA's reflection statistics), the plot."""
    data = read_result(folder / "analysis.json", "rerun peftlab analyze with --overwrite")
    section = Section(anchor("analysis", title), title, "peftlab analyze")
    layers = data.get("layers") if isinstance(data.get("layers"), list) else []
    section.facts = [("method", cell(data.get("method"))), ("shared layers", cell(len(layers)))]
    if data.get("distance"):
        section.facts.append(("distance", cell(data["distance"])))
    runs = data.get("runs") if isinstance(data.get("runs"), dict) else {}
    section.tables.append(Table("Runs", ["run", "group"], [[Cell(str(k)), cell(v)] for k, v in runs.items()]))
    factors = data.get("factors") if isinstance(data.get("factors"), dict) else {}
    if factors:
        section.tables.append(Table("Cosine distance of the factors (mean over layers)",
                                    ["factor", "within groups", "between groups", "between / within"],
                                    [[Cell(str(role)), *(cell((v.get("mean") or {}).get(k))
                                                         for k in ("within", "between", "ratio"))]
                                     for role, v in factors.items() if isinstance(v, dict)]))
        for role, v in factors.items():
            per_layer = v.get("per_layer") if isinstance(v, dict) else None
            if isinstance(per_layer, dict):
                section.tables.append(Table(f"{role}: per layer", ["layer", "within", "between", "ratio"], [
                    [Cell(str(layer)), *(cell(d.get(k)) for k in ("within", "between", "ratio"))]
                    for layer, d in per_layer.items() if isinstance(d, dict)], folded=True))
    reflections = data.get("reflections") if isinstance(data.get("reflections"), dict) else {}
    if reflections:
        section.tables.append(Table("HRA reflection vectors (mean over layers)",
                                    ["run", "group", "mean |cos| between u_i", "‖I − ÛᵀÛ‖_F"],
                                    [[Cell(str(name)), cell(r.get("group")),
                                      *(cell((r.get("mean") or {}).get(k)) for k in ("mean_abs_cos", "orthogonality"))]
                                     for name, r in reflections.items() if isinstance(r, dict)]))
    if found := figure(folder / "analysis.png", "t-SNE of the factors" if factors else "Reflection vectors per layer",
                       section):
        section.figures.append(found)
    return section


__all__ = ["REPORT_FILE", "folder_section", "report"]
