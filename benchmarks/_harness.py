"""What the benchmark scripts share: the machine header, timing, saved-for-backward memory, ratios, tables.

Each script under ``benchmarks/`` keeps only its own benchmark (what it measures, its sizes, its verdicts) and
imports this module (``python benchmarks/x.py`` puts ``benchmarks/`` on ``sys.path``):

- the header (:func:`header_lines`): command line, CPU and threads, load average, library versions and the
  git revision, so that a table can be traced back to the run that produced it;
- timing (:class:`Timings`, :func:`run_interleaved`): warm-up rounds discarded, the variants interleaved in
  a rotating order, medians of the kept repetitions, on the wall or the process CPU clock;
- memory (:class:`Saved`, :func:`measure_saved`): what autograd keeps for backward after one forward;
- ratios and number formats (:func:`ratio_of`, :func:`ratio`, :func:`fmt_ms`, :func:`fmt_mb`);
- Markdown tables and the report (:func:`markdown_table`, :func:`emit_report`) and the command-line options
  every timing script has (:func:`add_run_options`, :func:`apply_run_options`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

MB = 1024 * 1024
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


# -- machine and command -------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """Short HEAD commit of the checkout holding ``benchmarks/``, noting uncommitted changes under src/."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The command that runs this script, the interpreter relative to the working folder when inside it."""
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


def machine_line() -> str:
    """CPU, logical CPUs, torch threads, OMP_WAIT_POLICY and the load average now."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads = {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average at start = {load}"
    )


def versions_line(packages: Iterable[str] = ()) -> str:
    """Versions of python, torch, each of ``packages`` (imported by name) and peftlab with its git revision."""
    import peftlab

    extra = "".join(f", {name} {importlib.import_module(name).__version__}" for name in packages)
    return (
        f"python {platform.python_version()}, torch {torch.__version__}{extra}, "
        f"peftlab {peftlab.__version__} @ {git_revision()}"
    )


def busy_warning(hint: str = "") -> list[str]:
    """One warning line if the 1-minute load average is above half the CPUs (other jobs skew timings), else none."""
    if not hasattr(os, "getloadavg") or os.getloadavg()[0] <= 0.5 * (os.cpu_count() or 1):
        return []
    return [
        "WARNING: other jobs are running (load average above half the CPUs): wall-clock timings will be noisy"
        + (f"; {hint}" if hint else "")
    ]


def header_lines(packages: Iterable[str] = (), busy_hint: str = "") -> list[str]:
    """The run's header: busy-machine warning (if any), ``command:``, ``machine:`` and ``versions:`` lines."""
    return busy_warning(busy_hint) + [
        f"command: `{command_line()}`",
        f"machine: {machine_line()}",
        f"versions: {versions_line(packages)}",
    ]


# -- saved-for-backward accounting -----------------------------------------------------------------------------
@dataclass
class Saved:
    """What autograd keeps for backward after one forward (see :func:`measure_saved`)."""

    new_bytes: int = 0  # storages allocated by the forward
    shared_bytes: int = 0  # views of parameters, buffers or the input
    largest: tuple[int, ...] | None = None  # shape of the biggest new saved tensor
    square: bool = False  # a new weight-shaped tensor (every dim in square_dims) is saved

    def describe_largest(self) -> str:
        return "—" if self.largest is None else "×".join(str(s) for s in self.largest)


def measure_saved(fn: Callable[[], object], shared: Iterable[Tensor], square_dims: set[int] | None = None) -> Saved:
    """Run ``fn`` (a forward with grad enabled) and account the tensors autograd saves for backward.

    The tensors are recorded with ``torch.autograd.graph.saved_tensors_hooks``; memory is the sum of their
    unique storages, split into *shared* bytes (storages of the tensors in ``shared``: parameters, buffers,
    inputs, which exist anyway) and *new* bytes (allocated by the forward: the extra memory a training step
    holds until backward). ``largest`` is the shape of the biggest new saved tensor; ``square`` is set when a
    new 2-D tensor whose every dimension is in ``square_dims`` (e.g. ``{d}`` for a d × d weight) is saved.
    """
    records: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        records.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()  # the graph (and what it saved) lives until `records` is dropped
    shared_ptrs = {t.untyped_storage().data_ptr() for t in shared}
    result = Saved()
    seen: dict[int, int] = {}
    largest_bytes = -1
    for t in records:
        if not isinstance(t, Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        is_shared = ptr in shared_ptrs
        if ptr not in seen:
            seen[ptr] = nbytes
            if is_shared:
                result.shared_bytes += nbytes
            else:
                result.new_bytes += nbytes
        if is_shared:
            continue
        if nbytes > largest_bytes:
            largest_bytes, result.largest = nbytes, tuple(t.shape)
        # a view of a 3-D activation (tokens folded into rows) is not weight-shaped, whatever its 2-D shape
        base = t._base if t._base is not None else t
        if square_dims and base.dim() == 2 and set(base.shape) <= square_dims:
            result.square = True
    return result


# -- timing --------------------------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Kept time samples (seconds) per key, e.g. ``"lora/fwd_bwd"``."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def median_ms(self, key: str) -> float | None:
        """Median of the kept samples in milliseconds; ``None`` if ``key`` was not measured."""
        s = self.samples.get(key)
        return 1000 * statistics.median(s) if s else None

    def count(self, key: str) -> int:
        return len(self.samples.get(key, []))


def run_interleaved(
    jobs: dict[str, dict[str, Callable[[], object]]],
    reps: dict[str, int],
    warmups: dict[str, int],
    timings: Timings,
    cleanup: Callable[[str], None] = lambda _: None,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Time every (variant, measurement) job; variants alternate, their order rotating every round.

    ``jobs[variant][measurement]`` is a callable, timed with ``clock`` (a ``CLOCKS`` value) into
    ``timings["variant/measurement"]``. Variant v runs in rounds 0 … warmups[v] + reps[v] − 1 and keeps the
    timings of all but its first ``warmups[v]`` rounds (variants with fewer rounds stop early), so drift in
    machine load hits all variants alike. ``cleanup(variant)`` runs untimed after each call (e.g. to zero grads).
    """
    names = list(jobs)
    for rnd in range(max(warmups[n] + reps[n] for n in names)):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            if rnd >= warmups[name] + reps[name]:
                continue
            for what, fn in jobs[name].items():
                t0 = clock()
                fn()
                seconds = clock() - t0
                cleanup(name)
                if rnd >= warmups[name]:
                    timings.add(f"{name}/{what}", seconds)


# -- ratios and number formats ------------------------------------------------------------------------------------
def ratio_of(value: float | None, ref: float | None) -> float | None:
    """``value / ref``; ``None`` if either is missing or ``ref`` is 0."""
    return value / ref if value is not None and ref else None


def ratio(value: float | None, ref: float | None, digits: int = 2) -> str:
    """``value / ref`` as ``"1.23×"``; ``"—"`` if it cannot be computed."""
    x = ratio_of(value, ref)
    return "—" if x is None else f"{x:.{digits}f}×"


def fmt_ms(value: float | None) -> str:
    """Milliseconds: one decimal below 100, none above; ``"—"`` if missing."""
    if value is None:
        return "—"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def fmt_mb(nbytes: int | None) -> str:
    """Bytes as MiB: two decimals below 100 MiB, none above; ``"—"`` if missing."""
    if nbytes is None:
        return "—"
    return f"{nbytes / MB:,.2f}" if nbytes < 100 * MB else f"{nbytes / MB:,.0f}"


# -- tables, report, options ---------------------------------------------------------------------------------------
def markdown_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: list[str], rows: Iterable[list[str]], right: set[int] | None = None) -> list[str]:
    """A Markdown table as lines; the columns whose index is in ``right`` are right-aligned (numbers)."""
    align = ["---:" if right and i in right else "---" for i in range(len(header))]
    return [markdown_row(header), markdown_row(align), *(markdown_row(row) for row in rows)]


def variant_table(header: list[str], timings: Timings, variants: Iterable[str], labels: dict[str, str],
                  phases: list[str], ref: str, lead: list[str] | None = None,
                  extra: Callable[[str], list[str]] = lambda name: [], right: set[int] | None = None) -> list[str]:
    """A Markdown table of timed variants, one row each: ``lead`` cells, the variant's label, per phase its median
    ms and the ratio to variant ``ref`` in the same run, ``extra(variant)`` and the number of kept repetitions; a
    variant that was not measured reads "skipped"."""
    lead = lead or []
    refs = {phase: timings.median_ms(f"{ref}/{phase}") for phase in phases}
    rows = []
    for name in variants:
        if f"{name}/{phases[0]}" not in timings.samples:
            rows.append([*lead, labels[name], "skipped"] + ["—"] * (len(header) - len(lead) - 2))
            continue
        times = [timings.median_ms(f"{name}/{phase}") for phase in phases]
        cells = [cell for t, phase in zip(times, phases, strict=True) for cell in (fmt_ms(t), ratio(t, refs[phase]))]
        rows.append([*lead, labels[name], *cells, *extra(name), str(timings.count(f"{name}/{phases[0]}"))])
    return markdown_table(header, rows, right)


def medians_line(timings: Timings, variants: Iterable[str], labels: dict[str, str], phases: list[str]) -> str:
    """``LoRA 1.2/3.4 ms, HRA ...``: the median ms of each measured variant, its phases separated by ``/``."""
    return ", ".join(f"{labels[n]} {'/'.join(fmt_ms(timings.median_ms(f'{n}/{p}')) for p in phases)} ms"
                     for n in variants if f"{n}/{phases[0]}" in timings.samples)


def goal_line(goal: str, verdict: bool | str | None, detail: str = "") -> str:
    """One line of a benchmark's goals: ``goal: yes (detail)``; ``None`` reads "not measured"."""
    word = {True: "yes", False: "no", None: "not measured"}.get(verdict, verdict)  # type: ignore[call-overload]
    return f"{goal}: {word}" + (f" ({detail})" if detail else "")


def emit_report(lines: list[str], out: Path | None) -> None:
    """Print the report after a blank line and, if ``out`` is given, also write it there."""
    report = "\n".join(lines) + "\n"
    print()
    print(report, end="")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")


def parse_ints(text: str) -> list[int]:
    """``"768,1024"`` → ``[768, 1024]`` (an argparse ``type``)."""
    return [int(v) for v in text.split(",") if v.strip()]


def add_run_options(parser: argparse.ArgumentParser, *, out: bool = True, clock: bool = False) -> None:
    """Add ``--threads`` and, if asked, ``--out`` (the Markdown report) and ``--clock`` (a ``CLOCKS`` key)."""
    if out:
        parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    if clock:
        parser.add_argument(
            "--clock",
            choices=sorted(CLOCKS),
            default="wall",
            help="wall: elapsed time (default); cpu: process CPU time summed over threads, less sensitive to\n"
            "other jobs on a busy machine (most stable with --threads 1)",
        )


def apply_run_options(args: argparse.Namespace) -> None:
    """Set torch's thread count from ``--threads`` (left at torch's default when not given)."""
    if args.threads:
        torch.set_num_threads(args.threads)
