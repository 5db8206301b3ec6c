"""Peak memory while loading many adapters, with and without ``low_cpu_mem_usage``.

The script saves N adapters (HRA and LoRA alternating, every linear layer, rank --r) for one base model in a
folder (one at the top, the others in sub-folders, as ``save_pretrained`` writes several), then loads them all
with ``AdapterModel.from_pretrained(base, folder, low_cpu_mem_usage=...)``, each case in its own Python process
(the cases alternate, --repeats times; medians). In each process the base model is loaded first; then the
process's peak-RSS counter is reset (``/proc/self/clear_refs``, Linux) and the adapters are loaded, so

- *peak above base* = highest RSS while loading − RSS before loading (what loading the adapters costs at most),
- *kept anon* / *kept file* = growth of anonymous / file-backed RSS from before to after loading (safetensors
  maps the file copy-on-write: with ``low_cpu_mem_usage`` the parameters are those clean file pages, which the
  kernel can drop and re-read under memory pressure until they are written to),
- *load s* = wall time of ``from_pretrained``.

Without ``/proc/self/clear_refs`` a thread samples the RSS every millisecond instead (psutil).

    .venv/bin/python benchmarks/lowmem_loading.py            # SmolLM2-135M (offline `smollm2-135m`), 1 and 8 adapters
    .venv/bin/python benchmarks/lowmem_loading.py --quick    # a random 4-layer Llama stand-in
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _harness import (
    add_run_options,
    apply_run_options,
    emit_report,
    fmt_mb,
    header_lines,
    markdown_table,
    parse_ints,
)

CASES = {"ordinary": False, "low_cpu_mem_usage=True": True}


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def rss() -> dict[str, int]:
    """Anonymous and file-backed resident bytes of this process."""
    return {"anon": status_kib("RssAnon") * 1024, "file": status_kib("RssFile") * 1024}


class PeakRSS:
    """The highest RSS (bytes) of this process inside the ``with`` block."""

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the kernel's peak-RSS counter
            self.sampler = None
        except OSError:
            import psutil

            process, self.samples, self.done = psutil.Process(), [0], threading.Event()

            def sample() -> None:
                while not self.done.is_set():
                    self.samples.append(process.memory_info().rss)
                    time.sleep(0.001)

            self.sampler = threading.Thread(target=sample, daemon=True)
            self.sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is None:
            self.peak = status_kib("VmHWM") * 1024
        else:
            self.done.set()
            self.sampler.join()
            self.peak = max(self.samples)
        self.method = "VmHWM after clear_refs" if self.sampler is None else "psutil sampling every 1 ms"


def load_base(model_dir: str):
    from transformers import AutoModelForCausalLM

    from peftlab.base_models import quiet_transformers

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def child(args: argparse.Namespace) -> None:
    """One case in this process: load the base, then every adapter; print the measurements as JSON."""
    import gc

    from peftlab import AdapterModel

    base = load_base(args.model_dir)
    with torch.no_grad():  # transformers maps the checkpoint: fault every base weight in before measuring
        for p in base.parameters():
            p.sum()
    gc.collect()
    before, total = rss(), status_kib("VmRSS") * 1024
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        model = AdapterModel.from_pretrained(base, args.adapters_dir, low_cpu_mem_usage=args.low_cpu_mem_usage)
        seconds = time.perf_counter() - t0
    after = rss()
    assert len(model.peft_config) == args.adapters
    print("RESULT " + json.dumps({"peak": peak.peak - total, "anon": after["anon"] - before["anon"],
                                  "file": after["file"] - before["file"], "seconds": seconds, "method": peak.method}))


def prepare(args: argparse.Namespace, folder: Path) -> tuple[str, list[int]]:
    """Save the base (for --quick) and the adapters; return the base folder and each adapter's bytes."""
    from peftlab import AdapterModel, HRAConfig, LoraConfig

    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4)
        model_dir = str(folder / "base")
        LlamaForCausalLM(config).save_pretrained(model_dir)
    else:
        from peftlab.base_models import resolve_model

        model_dir = resolve_model("smollm2-135m")
    model = AdapterModel(load_base(model_dir))
    sizes = []
    for i in range(max(args.adapters)):
        name = "default" if i == 0 else f"adapter{i}"
        config_cls = HRAConfig if i % 2 == 0 else LoraConfig
        model.add_adapter(name, config_cls(r=args.r, target_modules="all-linear"))
        sizes.append(sum(t.numel() * t.element_size() for t in model.adapter_state_dict(name).values()))
        model.save_pretrained(folder / "adapters", selected_adapters=[name])
        model.delete_adapter(name)
    return model_dir, sizes


def adapters_folder(tmp: Path, n: int) -> Path:
    """A folder holding the first ``n`` saved adapters: hard links to the top adapter's files (peftlab refuses
    symbolic links that leave a folder) and symbolic links to the sub-folders of the others."""
    source, target = tmp / "adapters", tmp / f"first{n}"
    if not target.exists():
        target.mkdir()
        for item in source.iterdir():
            if item.is_file():
                os.link(item, target / item.name)
            elif int(item.name.removeprefix("adapter")) < n:
                (target / item.name).symlink_to(item)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a random 4-layer Llama (hidden 256) instead of SmolLM2")
    parser.add_argument("--adapters", type=parse_ints, default=[1, 8],
                        help="how many adapters to load, HRA and LoRA alternating; comma-separated cases (1,8)")
    parser.add_argument("--r", type=int, default=64, help="rank of every adapter (64)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per case, alternating (3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--adapters-dir", help=argparse.SUPPRESS)
    parser.add_argument("--low-cpu-mem-usage", type=int, default=0, help=argparse.SUPPRESS)
    add_run_options(parser)
    args = parser.parse_args()
    apply_run_options(args)
    if args.child:
        args.low_cpu_mem_usage, args.adapters = bool(args.low_cpu_mem_usage), args.adapters[0]
        return child(args)

    lines = header_lines(("transformers",))
    print("\n".join(lines), flush=True)
    results: dict[tuple[int, str], list[dict]] = {(n, case): [] for n in args.adapters for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, sizes = prepare(args, Path(tmp))
        for repeat in range(args.repeats):
            for n, case in results if repeat % 2 == 0 else list(results)[::-1]:
                command = [sys.executable, __file__, "--child", "--model-dir", model_dir, "--adapters-dir",
                           str(adapters_folder(Path(tmp), n)), "--low-cpu-mem-usage", str(int(CASES[case])),
                           "--adapters", str(n)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                out = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=True).stdout
                result = json.loads(out.split("RESULT ", 1)[1])
                results[n, case].append(result)
                print(f"{n} adapter(s), {case}: peak +{fmt_mb(result['peak'])} MiB, kept anon "
                      f"+{fmt_mb(result['anon'])} / file +{fmt_mb(result['file'])} MiB, {result['seconds']:.2f} s",
                      flush=True)
    base = "random Llama, 4 layers, hidden 256" if args.quick else "SmolLM2-135M (fp32)"
    method = next(iter(results.values()))[0]["method"]
    lines += [
        f"base: {base}; adapters: HRA / LoRA alternating, r={args.r}, all-linear, "
        f"{', '.join(fmt_mb(s) for s in sizes)} MiB each; RSS by {method}; medians of {args.repeats} processes",
        "",
    ]
    rows = []
    for (n, case), found in results.items():
        total = sum(sizes[:n])
        peak, anon, file, seconds = (statistics.median(r[k] for r in found) for k in ("peak", "anon", "file",
                                                                                       "seconds"))
        rows.append([str(n), fmt_mb(total), case, fmt_mb(int(peak)), f"{peak / total:.2f}", fmt_mb(int(anon)),
                     fmt_mb(int(file)), f"{seconds:.2f}"])
    header = ["adapters", "adapter MiB", "loading", "peak above base MiB", "peak / adapter MiB", "kept anon MiB",
              "kept file MiB", "load s"]
    lines += markdown_table(header, rows, right={0, 1, 3, 4, 5, 6, 7})
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
