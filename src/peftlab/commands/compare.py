"""``peftlab compare``: several methods and seeds under one budget, tabulated and plotted.

Every method (or variant ``METHOD:KEY=VALUE``) is trained with every seed under the same options; the
test metric is reported as mean ± sample std over seeds, with a 95 % interval from a bootstrap over seeds and
test items (:func:`peftlab.stats.bootstrap` on each run's ``test_items.jsonl``), next to trainable parameters,
time per step and peak memory, in ``compare.md`` / ``compare.json`` / ``compare.png``. A second table gives
each method's paired difference to LoRA (to the first method when LoRA is not compared) on the same seeds and
items, with its 95 % interval and a permutation test's p-value (:func:`peftlab.stats.paired_difference`).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import statistics
from pathlib import Path
from typing import Any

from peftlab import files, stats
from peftlab.commands.report_run import flat, grouped_metric
from peftlab.errors import PeftlabError, RecipeError
from peftlab.recipes import train
from peftlab.recipes.adapters import build_adapter_config, method_spec
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import check_output_dir, lock_output_dir, start_output_dir
from peftlab.recipes.test_items import read_items
from peftlab.recipes.training import pyplot


def compare(
    options: RunOptions, methods: list[str], seeds: list[int], lrs: dict[str, float] | None = None
) -> dict[str, Any]:
    """Train every method with every seed under the same budget (``options``) and tabulate the test metric.

    Each run goes to ``<output_dir>/<method>/seed-<seed>``; the learning rate is ``lrs[method]``, else
    ``options.lr``, else the method's default. Writes ``compare.json``, ``compare.md`` and ``compare.png``
    (metric against trainable parameters) into ``options.output_dir`` and returns the summary.
    """
    if not methods:
        raise RecipeError("--methods is empty; name at least one method, e.g. hra,lora,full,linear-probe")
    if len(set(methods)) != len(methods):
        raise RecipeError(f"--methods names a variant twice: {methods}")
    variants = {label: parse_variant(label) for label in methods}
    unknown = sorted(set(lrs or {}) - set(methods) - {method for method, _ in variants.values()})
    if unknown:
        raise RecipeError(f"--lrs names method(s) {unknown} that are not in --methods {methods}")
    if not seeds:
        raise RecipeError("--seeds must be at least 1")
    base = dataclasses.replace(options, method=variants[methods[0]][0]).resolved()
    with lock_output_dir(base.output_dir):  # one comparison per folder; each run locks its own sub-folder too
        check_output_dir(base, kind="compare")
        out = start_output_dir(base, kind="compare", extra={"methods": methods, "seeds": seeds, "lrs": lrs or {}})
        return _run_all(options, base, out, variants, seeds, lrs or {})


def _run_all(options: RunOptions, base: RunOptions, out: Path, variants: dict[str, tuple[str, dict[str, Any]]],
             seeds: list[int], lrs: dict[str, float]) -> dict[str, Any]:
    """Train every variant with every seed in ``out``; write and return the summary."""
    methods = list(variants)
    runs: list[dict[str, Any]] = []
    for label, (method, fields) in variants.items():
        for seed in seeds:
            lr = lrs.get(label) or lrs.get(method) or options.lr
            folder = out / re.sub(r"[^\w.-]+", "_", label) / f"seed-{seed}"
            config = {k: v for k, v in fields.items() if k != "r"}  # r: a tuned rank (compare --tune)
            run = dataclasses.replace(options, method=method, seed=seed, lr=lr, overwrite=False, resume=False,
                                      r=fields.get("r", options.r), adapter_args={**options.adapter_args, **config},
                                      output_dir=str(folder), keep_checkpoints=False)
            print(f"\n=== compare: {label}, seed {seed} ===", flush=True)
            gc.collect()
            metrics = train(run)
            runs.append({
                "method": label, "seed": seed, "lr": run.resolved().lr, "metric": metrics["metric"],
                "value": metrics["test"].get(metrics["metric"]), "trainable_params": metrics["trainable_params"],
                "total_params": metrics["total_params"], "seconds_per_step": metrics["seconds_per_step"],
                "peak_memory_mb": metrics["peak_memory_mb"], "peak_memory_kind": metrics["peak_memory_kind"],
                "other_metrics": other_metrics(metrics["test"], metrics["metric"]),
                "folder": str(folder.relative_to(out)),
            })
    rows = summarize(runs, methods)
    paired = item_statistics(out, runs, rows)
    table = markdown_table(rows, runs[0]["metric"], budget(base), paired)
    result = {"budget": budget(base), "metric": runs[0]["metric"], "rows": rows, "runs": runs, "paired": paired}
    files.atomic_write_json(out / "compare.json", result)
    (out / "compare.md").write_text(table + "\n")
    plot_comparison(rows, runs[0]["metric"], out / "compare.png")
    print("\n" + table, flush=True)
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}", flush=True)
    return result


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"mtlora-shim:init=identity:alpha=8"`` → ``("mtlora-shim", {"init": "identity", "alpha": 8})``.

    A compared variant is a method name, optionally followed by ``:KEY=VALUE`` fields of its config (values
    read as YAML scalars), so one comparison can hold the same method with different settings.
    """
    import yaml

    method, *pairs = text.split(":")
    spec = method_spec(method.strip())
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"method variant {text!r}: expected METHOD:KEY=VALUE[:KEY=VALUE...], got {pair!r}")
        fields[key.strip().replace("-", "_")] = yaml.safe_load(value)
    if fields:  # fail before the first run, not after hours of training
        try:
            build_adapter_config(spec.name, None, 8, options=fields)
        except PeftlabError as err:
            raise RecipeError(f"method variant {text!r}: {err}") from None
    return spec.name, fields


def budget(options: RunOptions) -> dict[str, Any]:
    """What every method of a comparison shares."""
    keys = ("task", "model", "data", "r", "epochs", "max_steps", "batch_size", "max_length", "max_train_samples")
    shared = {k: getattr(options, k) for k in keys}
    shared.update({k: getattr(options, k) for k in ("instance_data", "control") if getattr(options, k) is not None})
    if options.max_steps:  # max_steps overrides epochs
        del shared["epochs"]
    return shared


SKIPPED_METRICS = frozenset({"loss", "perplexity_bound"})


def other_metrics(test: dict[str, Any], main: str) -> dict[str, float]:
    """The test metrics besides the main one, flat: ``{"f1": …, "exact_match/arithmetic": …, "bleu": …}``.

    Nested per-group scores ``<metric>_by_<group>`` (``exact_match_by_task``, ``accuracy_by_domain``) become
    ``<metric>/<value>`` (:func:`peftlab.commands.report_run.flat`); the loss, other nested entries (MMLU's
    ``by_subject``) and non-numeric ones (the list of skipped metrics) are left out.
    """
    kept = {key: value for key, value in test.items() if key != main and key not in SKIPPED_METRICS
            and (not isinstance(value, dict) or grouped_metric(key))}
    return {key: float(value) for key, value in flat(kept).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: mean ± sample std of the metric (and of the other test metrics) over seeds; mean cost figures."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        values = [float(r["value"]) for r in mine if r["value"] is not None]
        others: dict[str, list[float]] = {}
        for r in mine:
            for key, value in r.get("other_metrics", {}).items():
                others.setdefault(key, []).append(value)
        rows.append({
            "method": method,
            "lr": mine[0]["lr"],
            "seeds": len(mine),
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "trainable_params": mine[0]["trainable_params"],
            "trainable_percent": 100 * mine[0]["trainable_params"] / mine[0]["total_params"],
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in mine),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in mine),
            "peak_memory_kind": mine[0]["peak_memory_kind"],
            "other_metrics": {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                              for k, v in others.items()},
        })
    return rows


BASELINE = "lora"


def item_statistics(out: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                    resamples: int = stats.RESAMPLES) -> dict[str, Any]:
    """Add each row's ``ci95`` (two-level bootstrap over seeds and test items) and return the paired table.

    Reads every run's ``test_items.jsonl``; the items are paired by key, seeds by their position in ``--seeds``.
    Returns ``{"baseline", "aggregate", "seeds", "items", "resamples", "rows": [{"method", "difference", "ci95",
    "p_value"}], "note"}``; when a run has no item scores (a folder from before they were written) or the runs were
    scored on different items, the rows keep ``ci95 = None`` and ``note`` says why.
    """
    methods = [r["method"] for r in rows]
    baseline = BASELINE if BASELINE in methods else methods[0]
    paired: dict[str, Any] = {"baseline": baseline, "rows": [], "note": None}
    for row in rows:
        row["ci95"] = None
    items = [read_items(out / run["folder"]) for run in runs]
    missing = [run["folder"] for run, found in zip(runs, items, strict=True) if found is None]
    if missing:
        paired["note"] = (f"no per-item test scores (test_items.jsonl) in {', '.join(missing)}: runs from before "
                          "peftlab wrote them, or a metric without per-item statistics; mean ± std only")
        return paired
    keys = items[0].keys
    if any(sorted(i.keys) != sorted(keys) or i.aggregate != items[0].aggregate for i in items):
        paired["note"] = "the runs were scored on different test items; no interval or paired difference"
        return paired
    order = {key: n for n, key in enumerate(keys)}
    for found in items:  # one item order for every run
        found.rows.sort(key=lambda row: order[row["key"]])
    aggregate = items[0].aggregate
    x = stats.statistics(aggregate, [i.rows for i in items])  # every run at once: groups and classes agree
    per_method = {m: x[[n for n, run in enumerate(runs) if run["method"] == m]] for m in methods}
    for row in rows:
        interval = stats.bootstrap(aggregate, per_method[row["method"]], resamples=resamples)
        row["ci95"] = [interval.low, interval.high]
    seeds = {m: [run["seed"] for run in runs if run["method"] == m] for m in methods}
    for method in methods:
        if method == baseline:
            continue
        if seeds[method] != seeds[baseline]:
            paired["note"] = f"{method} and {baseline} ran different seeds; no paired difference"
            continue
        diff = stats.paired_difference(aggregate, per_method[baseline], per_method[method], resamples=resamples)
        paired["rows"].append({"method": method, "difference": diff.estimate, "ci95": [diff.low, diff.high],
                               "p_value": diff.p_value})
    paired.update(aggregate=aggregate, seeds=len(seeds[baseline]), items=len(keys), resamples=resamples)
    return paired


def paired_table(paired: dict[str, Any], metric: str) -> list[str]:
    """The Markdown lines of the paired differences to the baseline (and the note, when there is one)."""
    lines = []
    if paired.get("rows"):
        lines += ["", f"Paired difference to {paired['baseline']} (test {metric} of the method minus "
                  f"{paired['baseline']}'s, on the same {paired['seeds']} seed(s) and {paired['items']} test items; "
                  f"95 % interval: bootstrap over seeds and items, {paired['resamples']} resamples; p-value: paired "
                  "permutation test over the test items, two-sided, given these seeds' trained models: unlike the "
                  "interval it does not count seed-to-seed variation, so with few seeds read the interval):", "",
                  "| method | difference | 95 % interval | p-value |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['difference']:+.4f} | [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | "
                  f"{r['p_value']:.4f} |" for r in paired["rows"]]
    if paired.get("note"):
        lines += ["", f"Note: {paired['note']}."]
    return lines


def markdown_table(rows: list[dict[str, Any]], metric: str, shared: dict[str, Any],
                   paired: dict[str, Any] | None = None) -> str:
    """The comparison as Markdown: test metric mean ± std over seeds and its 95 % interval (when the rows have
    ``ci95``), the other test metrics, and the paired differences to the baseline (``paired``)."""
    memory = "peak GPU mem (MB)" if rows and rows[0]["peak_memory_kind"].startswith("cuda") else "peak RSS (MB)"
    lines = [
        f"| method | lr | test {metric} (mean ± std) | 95 % interval | seeds | trainable params | trainable % | "
        f"s/step | {memory} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = "n/a" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f}"
        interval = "n/a" if r.get("ci95") is None else f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
        lines.append(f"| {r['method']} | {r['lr']:g} | {value} | {interval} | {r['seeds']} | "
                     f"{r['trainable_params']:,} | {r['trainable_percent']:.3f} | {r['seconds_per_step']:.3f} | "
                     f"{r['peak_memory_mb']:.0f} |")
    settings = ", ".join(f"{k}={v}" for k, v in shared.items() if v is not None)
    out = [f"Same budget for every method: {settings}.", "", *lines]
    if any(r.get("ci95") is not None for r in rows):
        out += ["", "95 % interval: percentile bootstrap of the mean over seeds, resampling seeds and test items "
                "(corpus metrics such as BLEU recomputed for every resample)."]
    names = list(dict.fromkeys(k for r in rows for k in r.get("other_metrics", {})))
    if names:  # the other test metrics, one column each (per-task exact match, BLEU / NIST / ROUGE-L, F1, ...)
        out += ["", "Other test metrics (mean ± std over seeds):", "",
                "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in rows:
            cells = [f"{m:.4f} ± {s:.4f}" if (m, s) != (None, None) else "n/a"
                     for m, s in (r.get("other_metrics", {}).get(n, (None, None)) for n in names)]
            out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(out + paired_table(paired or {}, metric))


def plot_comparison(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Test metric (mean ± std) against trainable parameters (log scale), one labelled point per method."""
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["mean"] is None:
            continue
        ax.errorbar(r["trainable_params"], r["mean"], yerr=r["std"], fmt="o", capsize=4)
        ax.annotate(r["method"], (r["trainable_params"], r["mean"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set(xlabel="trainable parameters (log scale)", ylabel=f"test {metric}",
           title=f"test {metric} vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
