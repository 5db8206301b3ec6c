r"""``peftlab analyze``: how the adapters of runs trained on different tasks relate to each other.

The HydraLoRA paper's motivation study (Tian et al., NeurIPS 2024, Fig. 2; its ``motivation/tesn_lora.sh``):
LoRA adapters trained on different tasks, their A and B matrices projected with t-SNE. The paper sees the A
matrices of all tasks fall together while the B matrices separate by task, and shares A across B heads.

For methods with low-rank factors (``Adapter.low_rank_factors``: LoRA's A and B, HydraLoRA's A and each B
head, MTLoRA's A, B and transform C / D), per role (A, B, …):

- one vector per factor matrix: one layer's whole matrix, flattened (HydraLoRA: one per B head). Not one per
  rank direction: the r directions of a run are unordered, so rank i of one run has no partner in another.
- distances: cosine distance 1 − cos(u, v) of the original (not projected) vectors, per layer, between
  vectors of *different runs*: "within" averages the pairs whose runs share a group, "between" the pairs of
  different groups; ratio = between / within (≈ 1: the groups do not separate; ≫ 1: they do). "mean":
  the mean over layers of within and of between, and their ratio. "run_pairs": the run × run matrix of mean
  distances (rows in the order of "runs"), which shows the pairs behind those means.
- t-SNE (scikit-learn, 2-d, ``random_state=0``, perplexity min(30, n − 1)) of all vectors of all runs and
  layers, each normalised to unit length (zero-padded to the longest when layers differ in shape).

HRA has no A / B: per run and layer it gets the mean |cos| between the r reflection vectors (columns of U)
and the orthogonality ‖I − ÛᵀÛ‖_F (paper Eq. 6).

:func:`analyze` writes ``analysis.json`` (the numbers) and ``analysis.png`` (the plots) and returns lines
for :mod:`peftlab.cli` to print.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab import files
from peftlab.errors import RecipeError
from peftlab.methods.base import ADAPTERS
from peftlab.recipes.rundir import is_adapter_dir, read_run

JSON_FILE = "analysis.json"
PLOT_FILE = "analysis.png"
SEED = 0


@dataclass
class Run:
    """One saved adapter: its folder, group, method and tensors per layer (module name → parameter → tensor)."""

    name: str
    group: str
    method: str
    layers: dict[str, dict[str, Tensor]]


# -- pure functions ------------------------------------------------------------------------------------------------
def cosine_distances(vectors: Tensor) -> Tensor:
    """1 − cos between every pair of rows of ``vectors`` (n, d): an (n, n) matrix (a zero row counts as
    orthogonal to everything)."""
    unit = torch.nn.functional.normalize(vectors.double().flatten(1), dim=1)
    return (1 - unit @ unit.t()).clamp(0, 2)


def group_distances(vectors: Tensor, groups: list[str], sources: list[Any] | None = None) -> dict[str, float | None]:
    """Mean cosine distance within and between groups, over the pairs of rows from different ``sources`` (default:
    every row its own source), and the ratio between / within. ``None`` where a kind of pair does not occur."""
    sources = list(range(len(groups))) if sources is None else sources
    d = cosine_distances(vectors)
    within, between = [], []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if sources[i] != sources[j]:
                (within if groups[i] == groups[j] else between).append(float(d[i, j]))
    return with_ratio(_mean(within), _mean(between))


def with_ratio(within: float | None, between: float | None) -> dict[str, float | None]:
    """``{"within", "between", "ratio"}``; the ratio is ``None`` when within is 0 or missing."""
    ratio = between / within if within and between is not None else None
    return {"within": within, "between": between, "ratio": ratio}


def mean_over_layers(per_layer: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """The mean of within and of between over layers, and the ratio of those means."""
    return with_ratio(_mean([v["within"] for v in per_layer.values() if v["within"] is not None]),
                      _mean([v["between"] for v in per_layer.values() if v["between"] is not None]))


def reflection_stats(u: Tensor) -> dict[str, float]:
    """HRA's U (d_in, r): mean |cos| between its r columns, and the orthogonality ‖I − ÛᵀÛ‖_F."""
    from peftlab.methods.hra import normalized_columns, orthogonality_penalty

    v = normalized_columns(u.double())
    r = v.shape[1]
    cos = (v.t() @ v).abs()
    mean_abs_cos = float((cos.sum() - cos.diagonal().sum()) / (r * (r - 1))) if r > 1 else 0.0
    return {"mean_abs_cos": mean_abs_cos, "orthogonality": float(orthogonality_penalty(u.double()).sqrt())}


def tsne_2d(vectors: Tensor, seed: int = SEED) -> Any:
    """2-d t-SNE (numpy, (n, 2)) of the unit-normalised rows of ``vectors``; perplexity min(30, n − 1)."""
    from sklearn.manifold import TSNE

    unit = torch.nn.functional.normalize(vectors.double().flatten(1), dim=1).numpy()
    perplexity = float(min(30, max(1, len(unit) - 1)))
    return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="random").fit_transform(unit)


def padded(matrices: list[Tensor]) -> Tensor:
    """The matrices flattened into rows of one tensor, zero-padded to the longest."""
    width = max(m.numel() for m in matrices)
    return torch.stack([torch.nn.functional.pad(m.double().flatten(), (0, width - m.numel())) for m in matrices])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- reading runs ---------------------------------------------------------------------------------------------------
def load_run(folder: str | os.PathLike, group: str | None = None) -> Run:
    """A saved adapter; its group defaults to the run's data name (run_config.json), else the folder name."""
    path = Path(folder)
    if not path.is_dir():
        raise RecipeError(f"{folder} is not a folder; give adapter folders written by peftlab train")
    if not is_adapter_dir(path):
        raise RecipeError(f"{folder} holds no adapter ({files.CONFIG_NAME}); give folders written by peftlab train")
    method = str(files.read_json(path / files.CONFIG_NAME).get("method"))
    if group is None:
        data = ((read_run(path) or {}).get("options") or {}).get("data")
        group = Path(str(data)).stem if data else path.resolve().name
    layers = {module: {name: value.detach().float() for name, value in state.items()}
              for module, state in files.by_module(files.load_tensors(path)).items()}
    return Run(str(folder), group, method, layers)


def load_runs(folders: list[str], groups: list[str] | None = None) -> list[Run]:
    """The runs, checked: at least 2, one method, the same tensor shapes on the layers they share."""
    if len(folders) < 2:
        raise RecipeError(f"analyze compares runs: give at least 2 adapter folders, got {len(folders)}")
    if groups is not None and len(groups) != len(folders):
        raise RecipeError(f"--groups names {len(groups)} groups for {len(folders)} runs; give one per run")
    runs = [load_run(f, groups[i] if groups else None) for i, f in enumerate(folders)]
    methods = sorted({run.method for run in runs})
    if len(methods) > 1:
        got = ", ".join(f"{r.name}: {r.method}" for r in runs)
        raise RecipeError(f"analyze compares runs of one method; got {got}")
    for module in shared_layers(runs):
        for name, tensor in runs[0].layers[module].items():
            for run in runs[1:]:
                other = run.layers[module].get(name)
                if other is None or other.shape != tensor.shape:
                    shape = None if other is None else list(other.shape)
                    raise RecipeError(f"{module}.{name} is {list(tensor.shape)} in {runs[0].name} but {shape} in "
                                      f"{run.name}; analyze compares runs of the same shape (model, targets, r)")
    return runs


def shared_layers(runs: list[Run]) -> list[str]:
    """The adapted layers present in every run, in the first run's order: those with low-rank factors (HRA: with
    reflection vectors), not the fully trained ``modules_to_save`` (a classifier head)."""
    common = set.intersection(*(set(run.layers) for run in runs))
    adapter_cls = ADAPTERS.get(runs[0].method)
    found = [m for m in runs[0].layers if m in common and ("hra_u" in runs[0].layers[m] or (
        adapter_cls is not None and adapter_cls.low_rank_factors(runs[0].layers[m])))]
    if not found:
        raise RecipeError("the runs share no adapted layer with low-rank factors; analyze compares runs of the same "
                          "model and targets, of a method with factors (lora, hydralora, mtlora) or hra")
    return found


# -- the two analyses -----------------------------------------------------------------------------------------------
def factor_analysis(runs: list[Run]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON numbers, plot points) of the low-rank factors of every role (A, B, …)."""
    adapter_cls = ADAPTERS.get(runs[0].method)
    factors: dict[str, dict[str, list[tuple[Tensor, int]]]] = {}  # role → layer → [(matrix, run index)]
    for module in shared_layers(runs):
        for index, run in enumerate(runs):
            found = adapter_cls.low_rank_factors(run.layers[module]) if adapter_cls else {}
            for role, matrices in found.items():
                factors.setdefault(role, {}).setdefault(module, []).extend((m, index) for m in matrices)
    if not factors:
        raise RecipeError(f"method {runs[0].method} has no low-rank factors to compare (Adapter.low_rank_factors)")
    numbers: dict[str, Any] = {}
    points: dict[str, Any] = {}
    for role, layers in factors.items():
        per_layer = {}
        for module, items in layers.items():
            per_layer[module] = group_distances(padded([m for m, _ in items]), [runs[i].group for _, i in items],
                                                [i for _, i in items])
        numbers[role] = {"mean": mean_over_layers(per_layer), "per_layer": per_layer,
                         "run_pairs": run_pair_distances(layers, len(runs))}
        items = [item for entries in layers.values() for item in entries]
        points[role] = (tsne_2d(padded([m for m, _ in items])), [runs[i].group for _, i in items])
    return numbers, points


def run_pair_distances(layers: dict[str, list[tuple[Tensor, int]]], n: int) -> list[list[float | None]]:
    """Run × run: the mean cosine distance between their matrices, over layers (and heads); shows which pairs
    make the within / between means (e.g. runs of one seed sharing their initial A)."""
    sums, counts = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n)
    for items in layers.values():
        d = cosine_distances(padded([m for m, _ in items]))
        for i, (_, a) in enumerate(items):
            for j, (_, b) in enumerate(items):
                sums[a, b] += d[i, j]
                counts[a, b] += 1
    return [[round(float(s / c), 6) if c else None for s, c in zip(srow, crow, strict=True)]
            for srow, crow in zip(sums, counts, strict=True)]


def reflection_analysis(runs: list[Run]) -> dict[str, Any]:
    """HRA: per run, the reflection vectors' mean |cos| and orthogonality per layer and their means."""
    out: dict[str, Any] = {}
    for run in runs:
        layers = [m for m in shared_layers(runs) if "hra_u" in run.layers[m]]
        per_layer = {m: reflection_stats(run.layers[m]["hra_u"]) for m in layers}
        mean = {k: _mean([v[k] for v in per_layer.values()]) for k in ("mean_abs_cos", "orthogonality")}
        out[run.name] = {"group": run.group, "mean": mean, "per_layer": per_layer}
    return out


# -- plots ----------------------------------------------------------------------------------------------------------
def plot_factors(points: dict[str, Any], numbers: dict[str, Any], path: Path) -> None:
    """One t-SNE scatter panel per role, coloured by group."""
    from peftlab.recipes.training import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4.5), squeeze=False)
    for ax, (role, (xy, groups)) in zip(axes[0], points.items(), strict=True):
        for group in dict.fromkeys(groups):
            rows = [i for i, g in enumerate(groups) if g == group]
            ax.scatter(xy[rows, 0], xy[rows, 1], s=18, alpha=0.8, label=group)
        ratio = numbers[role]["mean"]["ratio"]
        ax.set(title=f"{role} (t-SNE); between/within {ratio:.2f}" if ratio else f"{role} (t-SNE)",
               xticks=[], yticks=[])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reflections(numbers: dict[str, Any], path: Path) -> None:
    """HRA: per-layer bars of mean |cos| and orthogonality, one bar per run."""
    from peftlab.recipes.training import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(numbers)
    for ax, key, title in zip(axes, ("mean_abs_cos", "orthogonality"), ("mean |cos| between u_i", "‖I − ÛᵀÛ‖_F"),
                              strict=True):
        for k, (name, run) in enumerate(numbers.items()):
            values = list(run["per_layer"].values())
            ax.bar([i + k * width for i in range(len(values))], [v[key] for v in values], width,
                   label=f"{run['group']}: {Path(name).name}")
        ax.set(title=title, xlabel="layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command ----------------------------------------------------------------------------------------------------
def analyze(folders: list[str], groups: list[str] | None, out: str | os.PathLike,
            overwrite: bool = False) -> list[str]:
    """Compare the runs' adapters (see the module docstring); write analysis.json / .png to ``out``.

    An earlier analysis in ``out`` is replaced only with ``overwrite`` (else RecipeError, before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} exists and is a file, not a folder")
    earlier = [name for name in (JSON_FILE, PLOT_FILE) if (out / name).exists()]
    if earlier and not overwrite:
        raise RecipeError(f"--out {out} already holds {' and '.join(earlier)} of an earlier analysis; pass "
                          "--overwrite to replace them, or choose another --out folder")
    runs = load_runs(list(folders), groups)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(run.group for run in runs)
    method = runs[0].method
    lines = [f"{len(runs)} {method} runs, {len(shared_layers(runs))} shared layers; groups: "
             + ", ".join(f"{g} ×{n}" for g, n in counts.items())]
    data: dict[str, Any] = {"method": method, "runs": {r.name: r.group for r in runs}, "layers": shared_layers(runs)}
    if method == "hra":
        data["reflections"] = reflection_analysis(runs)
        for name, run in data["reflections"].items():
            mean = run["mean"]
            lines.append(f"  {name} ({run['group']}): mean |cos| {mean['mean_abs_cos']:.4f}, "
                         f"‖I − ÛᵀÛ‖_F {mean['orthogonality']:.4f} (mean over layers)")
        plot_reflections(data["reflections"], out / PLOT_FILE)
    else:
        data["distance"] = "cosine distance 1 - cos of the flattened factor matrices, pairs of different runs"
        data["factors"], points = factor_analysis(runs)
        for role, numbers in data["factors"].items():
            m = numbers["mean"]
            lines.append(f"  {role}: within-group {_text(m['within'])}, between-group {_text(m['between'])}, "
                         f"between/within {_text(m['ratio'])} (mean over layers)")
        plot_factors(points, data["factors"], out / PLOT_FILE)
    files.atomic_write_json(out / JSON_FILE, data)
    lines.append(f"wrote {out / JSON_FILE}" + (f" and {out / PLOT_FILE}" if (out / PLOT_FILE).is_file() else ""))
    return lines


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
