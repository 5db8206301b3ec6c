"""``peftlab compare --tune lr[,r] [--trials N]``: per method a search on the validation split, then the chosen
setting trained with every seed and scored on the test split (through :mod:`peftlab.commands.compare`).

Search space of a method with default learning rate d (its method spec; image tasks: at most 3e-3): the learning
rate log-uniform in [d/10, 10·d] and, with ``--tune lr,r``, the rank r ∈ {4, 8, 16} for methods that have one
(``full`` and ``linear-probe`` have none: only their lr is searched). With N ≤ :data:`GRID_MAX` the N trials are a
log grid (``numpy.geomspace(d/10, 10·d, N)``; N = 1: d), each at every r; otherwise optuna's TPE sampler proposes
them (the first half at random), seeded by ``--seed`` plus the number of finished trials, so a search proposes
the same settings however often it is killed and resumed. A median pruner (after :data:`PRUNE_AFTER` complete
trials) stops a text trial whose validation score at an evaluation step is below the median of the complete
trials' at that step; the scores are those the Trainer computes every ``--eval-steps`` (the task's main metric;
causal-lm and data-to-text: the validation loss). Image tasks evaluate nothing while training, so their trials
are never pruned.

A trial trains with the first seed and is scored at its end on validation (``RunOptions.score_split``), never on
test: text tasks score their validation split as the test split is scored (classification: the validation rows
evaluated during training; causal-lm / data-to-text: generation on up to ``--max-test-samples`` validation rows);
image tasks, which have no validation split, score samples drawn with other noise seeds (the seed + 10 000) and
(controllable) other examples: ``tiny-digits-edges``' other held-out digits, each class's last instead of its
first; a data folder's last examples instead of its first (training examples both). The best complete trial
(on ties: the best of the Trainer's validation evaluations, e.g. the loss; then the earliest) is then trained
with every seed through ``compare`` and scored on test.

Writes ``trials.csv``, ``trials.png`` (validation score against lr) and ``trials.journal`` (optuna's journal: the
search's state) besides compare's files; compare.md and compare.json gain a "tuned" part. Each finished trial's run
folder (adapter, metrics, curve; no checkpoints) is kept under ``trials/<method>/<k>``; a pruned trial's is removed.
``--resume`` continues a killed search: finished trials are kept, the one that was running is run again, and the
final runs with ``--seeds`` are run again in full.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftlab import files
from peftlab.commands.compare import _run_all, parse_variant
from peftlab.errors import RecipeError
from peftlab.recipes import train
from peftlab.recipes.adapters import method_spec
from peftlab.recipes.options import IMAGE_MAX_DEFAULT_LR, IMAGE_TASKS, RunOptions
from peftlab.recipes.rundir import EMPTY, RUN_FILE, folder_state, lock_output_dir, read_run, start_output_dir
from peftlab.recipes.training import added_callbacks, pyplot

KIND = "compare-tune"
KEYS = ("lr", "r")  # what --tune searches
RANKS = (4, 8, 16)  # --tune lr,r: the ranks searched
GRID_MAX = 4  # --trials up to this: a log grid of learning rates; more: optuna's TPE sampler
LR_SPAN = 10.0  # the lr range is [default / LR_SPAN, default · LR_SPAN]
PRUNE_AFTER = 2  # complete trials before the median pruner stops any
LOWER_IS_BETTER = frozenset({"landmark_error", "loss", "perplexity"})
NOT_SEARCH_IDENTITY = frozenset({"output_dir", "resume", "overwrite", "report_to"})


def parse_tune(text: str | list[str]) -> tuple[str, ...]:
    """``"lr"`` / ``"lr,r"`` (or a list from a YAML config) → the searched keys, checked."""
    keys = [str(k).strip() for k in (text.split(",") if isinstance(text, str) else text) if str(k).strip()]
    unknown = [k for k in keys if k not in KEYS]
    if unknown or "lr" not in keys or len(set(keys)) != len(keys):
        what = f"unknown key(s) {unknown}" if unknown else f"got {','.join(keys) or 'nothing'}"
        raise RecipeError(f"--tune: {what}; search the learning rate (--tune lr) or it and the rank (--tune lr,r)")
    return tuple(k for k in KEYS if k in keys)


@dataclass(frozen=True)
class Space:
    """What one method's search tries: its lr range and, where it has a rank and ``r`` is tuned, the ranks."""

    low: float
    high: float
    ranks: tuple[int, ...] = ()

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        found: dict[str, Any] = {"lr": FloatDistribution(self.low, self.high, log=True)}
        if self.ranks:
            found["r"] = CategoricalDistribution(self.ranks)
        return found

    def grid(self, trials: int) -> list[dict[str, Any]]:
        """The grid of a small search: ``trials`` log-spaced lrs (one: the default), each at every rank."""
        import numpy as np

        lrs = [(self.low * self.high) ** 0.5] if trials == 1 else np.geomspace(self.low, self.high, trials).tolist()
        return [{"lr": float(f"{lr:.6g}"), **({"r": r} if self.ranks else {})} for lr in lrs
                for r in (self.ranks or (None,))]


def search_space(options: RunOptions, method: str, keys: tuple[str, ...]) -> Space:
    """The method's space: lr in [d/10, 10·d] around its default d; ranks where the method has a rank."""
    spec = method_spec(method)
    default = min(spec.lr, IMAGE_MAX_DEFAULT_LR) if options.task in IMAGE_TASKS else spec.lr
    ranks = RANKS if "r" in keys and spec.config_class is not None else ()
    return Space(float(f"{default / LR_SPAN:.6g}"), float(f"{default * LR_SPAN:.6g}"), ranks)


def planned_trials(space: Space, trials: int) -> int:
    """Trials of a search: the grid's size for a small one, else ``trials``."""
    return len(space.grid(trials)) if trials <= GRID_MAX else trials


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RecipeError("--tune needs optuna: pip install 'peftlab[tune]' (or optuna==5.1.0)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def journal(path: Path) -> Any:
    """optuna's file journal at ``path``: every trial's start, reports and end, appended under a file lock."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    require_optuna()
    return JournalStorage(JournalFileBackend(str(path)))


class ReportToPruner(TrainerCallback):
    """Reports each validation score of a trial to optuna at its step and raises ``optuna.TrialPruned`` when the
    pruner says so. The score is signed so that higher is better (the loss negated), as the study maximises."""

    def __init__(self, trial: Any) -> None:
        self.trial, self.steps = trial, 0
        self.metric: str | None = None  # what the Trainer evaluates (causal-lm / data-to-text: the loss)
        self.best: float | None = None  # its best value in this trial

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **_: Any) -> None:
        import optuna

        value = (metrics or {}).get(f"eval_{args.metric_for_best_model}")
        if value is None:  # the recipe's own evaluations before and after training (other prefixes)
            return
        self.steps, self.metric = state.global_step, args.metric_for_best_model
        if self.best is None or (value > self.best if args.greater_is_better else value < self.best):
            self.best = value
        self.trial.report(value if args.greater_is_better else -value, state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation {args.metric_for_best_model} {value:.4g} at step "
                                     f"{state.global_step} is below the median of the complete trials")


def trial_options(options: RunOptions, method: str, fields: dict[str, Any], params: dict[str, Any],
                  folder: Path) -> RunOptions:
    """A trial's run: the searched params, scored on validation, no checkpoints kept; otherwise as the final run
    of its first seed trains (the step-0 evaluation too: it changes what the seeded training draws)."""
    return dataclasses.replace(
        options, method=method, lr=params["lr"], r=params.get("r", options.r), resume=False, overwrite=False,
        adapter_args={**options.adapter_args, **fields}, output_dir=str(folder), keep_checkpoints=False,
        score_split="validation")


def run_search(options: RunOptions, label: str, space: Space, trials: int, storage: Any, folder: Path,
               prune_after: int = PRUNE_AFTER) -> list[dict[str, Any]]:
    """Search ``label``'s space (study ``label`` in ``storage``) until ``trials`` trials are complete or pruned;
    trial k trains in ``folder/k``. A trial left running by a killed search is marked failed and run again.
    Returns one row per finished trial (the rows of ``trials.csv``)."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    method, fields = parse_variant(label)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_after)
    study = optuna.create_study(study_name=label, storage=storage, direction="maximize", load_if_exists=True)
    for killed in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(killed._trial_id, TrialState.FAIL)
        print(f"compare --tune: {label}: trial {killed.user_attrs.get('k', '?')} was running when the search "
              "stopped; it runs again", flush=True)
    grid = space.grid(trials) if trials <= GRID_MAX else None
    total = len(grid) if grid else trials
    while (k := len(finished(study))) < total:
        # seeded per trial, so a resumed search proposes what an uninterrupted one would; random for the first half
        sampler = optuna.samplers.TPESampler(seed=options.seed + k, n_startup_trials=max(2, trials // 2))
        study = optuna.load_study(study_name=label, storage=storage, sampler=sampler, pruner=pruner)
        if grid and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.enqueue_trial(grid[k])
        trial = study.ask(space.distributions())
        params = {key: trial.params[key] for key in ("lr", "r") if key in trial.params}
        run = trial_options(options, method, fields, params, folder / str(k))
        shutil.rmtree(run.output_dir, ignore_errors=True)  # a killed trial's folder: it runs again from the start
        trial.set_user_attr("k", k)
        print(f"\n=== compare --tune: {label}, trial {k + 1}/{total}: "
              + ", ".join(f"{key}={value:g}" for key, value in params.items()) + " ===", flush=True)
        report, start = ReportToPruner(trial), time.perf_counter()
        gc.collect()
        try:
            with added_callbacks(report):
                metrics = train(run)
        except optuna.TrialPruned as pruned:
            print(f"compare --tune: {label}, trial {k + 1} pruned: {pruned}", flush=True)
            for key, value in {"steps": report.steps, "seconds": time.perf_counter() - start,
                               "eval_metric": report.metric, "best_eval": report.best}.items():
                trial.set_user_attr(key, value)
            study.tell(trial, state=TrialState.PRUNED)
            shutil.rmtree(run.output_dir, ignore_errors=True)
            continue
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
        metric = metrics["metric"]
        score = float(metrics["validation"][metric])
        for key, value in {"metric": metric, "score": score, "steps": int(metrics.get("global_step") or 0),
                           "seconds": time.perf_counter() - start, "eval_metric": report.metric,
                           "best_eval": report.best}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, -score if metric in LOWER_IS_BETTER else score)
    return [trial_row(label, t) for t in finished(study)]


def finished(study: Any) -> list[Any]:
    """The complete and pruned trials of a study, in the order they ran."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_row(label: str, trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {"method": label, "trial": attrs["k"], "lr": trial.params["lr"], "r": trial.params.get("r"),
            "metric": attrs.get("metric"), "validation_score": attrs.get("score"),
            "state": trial.state.name.lower(), "steps": attrs.get("steps"), "seconds": round(attrs["seconds"], 3),
            "eval_metric": attrs.get("eval_metric"), "best_eval": attrs.get("best_eval")}


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The complete trial with the best validation score; on ties (exact match 0 for all, say) the one with the
    best value the Trainer's evaluations saw (``best_eval``: the validation loss of causal-lm / data-to-text),
    then the earliest."""
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        raise RecipeError(f"compare --tune: every trial of {rows[0]['method']} was pruned; raise --trials")

    def key(row: dict[str, Any]) -> tuple[float, float, int]:
        score = -row["validation_score"] if row["metric"] in LOWER_IS_BETTER else row["validation_score"]
        best = row["best_eval"]
        tie = -float("inf") if best is None else -best if row["eval_metric"] in LOWER_IS_BETTER else best
        return score, tie, -row["trial"]

    return max(complete, key=key)


# -- the command ------------------------------------------------------------------------------------------------------
def tune(options: RunOptions, methods: list[str], seeds: list[int], keys: tuple[str, ...] | str, trials: int,
         lrs: dict[str, float] | None = None) -> dict[str, Any]:
    """Search every method's lr (and r) on validation, then train the chosen setting with every seed (compare).

    Returns compare's summary with ``tuned``: per method the chosen ``lr`` (and ``r``), its validation score and
    its trial count. ``options.resume`` continues a killed search in ``options.output_dir``.
    """
    keys = parse_tune(keys) if isinstance(keys, str) else keys
    check_request(options, methods, keys, trials, lrs or {})
    variants = {label: parse_variant(label) for label in methods}
    base = dataclasses.replace(options, method=variants[methods[0]][0]).resolved()
    search = {"methods": methods, "seeds": seeds, "tune": list(keys), "trials": trials}
    with lock_output_dir(base.output_dir):
        out = open_search(base, search)
        if base.resume and (out / "compare.json").is_file() and "tuned" in files.read_json(out / "compare.json"):
            print(f"compare --tune: {out} holds a finished search and its final runs; nothing to resume", flush=True)
            return files.read_json(out / "compare.json")
        storage, rows, chosen = journal(out / "trials.journal"), [], {}
        for label, (method, _) in variants.items():
            space = search_space(base, method, keys)
            found = run_search(options, label, space, trials, storage, out / "trials" / safe_name(label))
            rows += found
            chosen[label] = {**best_row(found), "trials": len(found),
                             "pruned": sum(r["state"] == "pruned" for r in found)}
            write_trials(out, rows)
        plot_trials(rows, chosen, out / "trials.png")
        final = {label: (method, {**fields, **({"r": chosen[label]["r"]} if chosen[label]["r"] else {})})
                 for label, (method, fields) in variants.items()}
        for label in methods:  # a resumed search trains its final runs again (they may be half done)
            shutil.rmtree(out / safe_name(label), ignore_errors=True)
        result = _run_all(dataclasses.replace(options, resume=False), base, out, final, seeds,
                          {label: row["lr"] for label, row in chosen.items()})
        result["tuned"] = chosen
        files.atomic_write_json(out / "compare.json", result)
        section = tuned_section(chosen, keys, trials)
        files.atomic_write_bytes(out / "compare.md", ((out / "compare.md").read_text() + "\n" + section).encode())
        print("\n" + section + f"\nwrote {out / 'trials.csv'} and {out / 'trials.png'}", flush=True)
    return result


def safe_name(label: str) -> str:
    """The folder name of a method variant (as compare names it)."""
    return re.sub(r"[^\w.-]+", "_", label)


def check_request(options: RunOptions, methods: list[str], keys: tuple[str, ...], trials: int,
                  lrs: dict[str, float]) -> None:
    """One-line errors for a search that cannot be run as asked."""
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise RecipeError(f"--trials must be a positive integer (the settings tried per method); got {trials!r}")
    if options.lr is not None:
        raise RecipeError("--lr fixes every method's learning rate, which --tune lr searches: drop --lr (or --tune)")
    fixed = [name for name in lrs if name in methods or name in {parse_variant(m)[0] for m in methods}]
    if fixed:
        raise RecipeError(f"--lrs fixes the learning rate of {', '.join(fixed)}, which --tune lr searches: drop "
                          f"{', '.join(fixed)} from --lrs (or drop --tune)")
    if options.overwrite and options.resume:
        raise RecipeError("--resume continues the search in the output folder and --overwrite deletes it: pick one")


def open_search(base: RunOptions, search: dict[str, Any]) -> Path:
    """Check the output folder and record the search in it; ``--resume``: it must hold this very search."""
    out = Path(base.output_dir)
    previous = read_run(out)
    if base.resume:
        if previous is None or previous.get("kind") != KIND:
            raise RecipeError(f"--resume: {out} holds no `compare --tune` search ({RUN_FILE} of one); start it "
                              "without --resume")
        old, new = previous["options"], base.to_dict()
        diffs = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if k not in NOT_SEARCH_IDENTITY
                 and old.get(k) != new[k]]
        diffs += [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in search.items() if previous.get(k) != v]
        if diffs:
            raise RecipeError(f"--resume: {out} holds a different search ({'; '.join(diffs)}); resume it with its own "
                              "options, or start a new one in another --output-dir")
    elif folder_state(out) != EMPTY and not (base.overwrite and previous is not None):
        what = "a `compare --tune` search" if previous and previous.get("kind") == KIND else "something else"
        raise RecipeError(f"--output-dir {out} already holds {what}; pass --resume to continue a search, --overwrite "
                          "to replace it, or choose another --output-dir")
    return start_output_dir(base, kind=KIND, extra=search)


def write_trials(out: Path, rows: list[dict[str, Any]]) -> None:
    """``trials.csv``: one row per finished trial (method, trial, lr, r, metric, validation score, state, steps,
    seconds, and the best value of what the Trainer evaluated during training: ``eval_metric``, ``best_eval``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    files.atomic_write_bytes(out / "trials.csv", buffer.getvalue().encode())


def tuned_section(chosen: dict[str, dict[str, Any]], keys: tuple[str, ...], trials: int) -> str:
    """compare.md's "tuned" part: per method the chosen setting, its validation score and its trials."""
    how = f"a log grid of {trials} learning rates" if trials <= GRID_MAX else f"{trials} TPE trials"
    lines = [f"Tuned ({', '.join(keys)}) on the validation split, {how} per method"
             f"{' (each at r = ' + ', '.join(map(str, RANKS)) + ')' if 'r' in keys and trials <= GRID_MAX else ''}; "
             "the table above trains the chosen setting with every seed and scores it on test.", "",
             "| method | chosen lr | chosen r | validation score | trials (pruned) |", "|---|---|---|---|---|"]
    for label, row in chosen.items():
        lines.append(f"| {label} | {row['lr']:.3g} | {row['r'] or '-'} | {row['metric']} "
                     f"{row['validation_score']:.4f} | {row['trials']} ({row['pruned']}) |")
    return "\n".join(lines) + "\n"


def plot_trials(rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], path: Path) -> None:
    """Validation score against lr (log scale): a line per method (and rank); the chosen trial starred."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["state"] == "complete":
            groups.setdefault(row["method"] + (f", r={row['r']}" if row["r"] else ""), []).append(row)
    for name, mine in groups.items():
        mine.sort(key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in mine], [r["validation_score"] for r in mine], marker="o", label=name)
    for row in chosen.values():
        ax.plot(row["lr"], row["validation_score"], marker="*", markersize=14, color="black", linestyle="none")
    metric = next((r["metric"] for r in rows if r["metric"]), "score")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel=f"validation {metric}",
           title=f"validation {metric} vs learning rate (★ chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
