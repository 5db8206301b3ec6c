"""``peftlab``: train, evaluate, compare, merge, export and inspect adapters from the command line.

    peftlab train   --model minilm --data movie-snippets --method hra --r 8 --output-dir runs/hra
    peftlab eval    --adapter runs/hra [--model minilm] [--data movie-snippets]
    peftlab compare --model minilm --data movie-snippets --methods hra,lora,full,linear-probe --seeds 3
    peftlab merge   --adapter runs/hra --out merged/          (a plain transformers checkpoint)
    peftlab export  --adapter runs/hra --format peft --out peft-adapter/
    peftlab inspect runs/hra
    peftlab generate --adapter runs/dog --prompt "a photo of sks dog" --num-images 4 --out grid.png
    peftlab analyze runs/lora-a runs/lora-b runs/lora-c runs/lora-d --out analysis/   (A vs B across tasks)
    peftlab serve   --model smollm2-135m --adapter math=runs/math --adapter chat=runs/chat --port 8000
    peftlab estimate --model configs/models/llama-2-7b.json --method hra --r 32 --gradient-checkpointing

Every subcommand takes ``--config file.yaml`` (keys are the long option names; flags given on the
command line win). Bad input ends with one ``peftlab <command>: error: ...`` line on stderr and exit
code 2. Training goes through HF ``Trainer``, so ``torchrun --nproc_per_node N -m peftlab.cli train ...``
and ``accelerate launch -m peftlab.cli train ...`` run it distributed unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from peftlab._version import __version__
from peftlab.cli_flags import add_field_flags, add_method_flags, non_negative_int, positive_int, report_flags
from peftlab.errors import PeftlabError
from peftlab.errors import UsageError as CLIError

EXIT_BAD_INPUT = 2
GENERATION_FIELDS = ("max_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_flags(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    from peftlab.recipes.options import RunOptions

    add_method_flags(parser)
    add_field_flags(parser, RunOptions, exclude=("method", *exclude))


def _adapter_to_folder_flags(p: argparse.ArgumentParser) -> None:
    """The flags of commands that read an adapter folder and write another folder (merge, export)."""
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--overwrite", action="store_true", default=None, help="write into a non-empty --out")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    from peftlab.recipes.options import SPLITS, RunOptions
    from peftlab.recipes.text.multiple_choice import CONTINUATIONS, TASK

    p.add_argument("--adapter", help="the run's output folder (adapter or full model); optional with --task " + TASK)
    p.add_argument("--task", help=f"task, when the folder does not record it; {TASK}: accuracy on MMLU-style "
                   "questions, each option scored by log-likelihood (a base --model, or any --adapter run)")
    p.add_argument("--split", choices=SPLITS, help="split to score (default test; a --data FILE is scored whole "
                   "unless --split picks one of its seeded splits)")
    p.add_argument("--max-samples", type=positive_int, help=f"score at most N examples ({TASK}: per subject)")
    p.add_argument("--batch-size", type=positive_int, help="evaluation batch size")
    p.add_argument("--output", metavar="FILE.json", help="also write the metrics to this JSON file")
    p.add_argument("--items", metavar="FILE.jsonl", help="also write the per-item scores (one row per example, "
                   "as a run's test_items.jsonl), e.g. for a paired comparison of two runs")
    add_field_flags(p, RunOptions, include=("model", "data", "text_column", "label_column", *GENERATION_FIELDS),
                    help={"model": "base model (default: the one the adapter was trained on; "
                                   f"{TASK} without --adapter: smollm2-135m)",
                          "data": "data set name or file (default: the training data's test split; "
                                  f"{TASK}: mmlu, or a .jsonl/.csv file with its columns)"})
    group = p.add_argument_group(TASK)
    group.add_argument("--subjects", help="comma-separated subjects, e.g. anatomy,high_school_biology (default all)")
    group.add_argument("--shots", type=non_negative_int, help="answered examples before each question: the "
                       "subject's first dev rows, else its first questions, then not scored (default 0)")
    group.add_argument("--continuation", choices=CONTINUATIONS, help="what is scored after 'Answer:': the option's "
                       "letter (OpenCompass MMLU PPL) or its text (default letter)")


def _compare_flags(p: argparse.ArgumentParser) -> None:
    from peftlab.recipes.options import RunOptions

    p.add_argument("--methods", help="comma-separated methods (default hra,lora,full,linear-probe); a method may carry "
                   "config fields as METHOD:KEY=VALUE[:KEY=VALUE], e.g. mtlora-shim:init=identity")
    p.add_argument("--seeds", type=positive_int, help="number of seeds, starting at --seed (default 3)")
    p.add_argument("--seed", type=int, help="first seed (default 0)")
    p.add_argument("--lrs", help="per-method learning rates, e.g. hra=5e-3,lora=1e-3 (others: --lr or defaults)")
    group = p.add_argument_group("tuning (compare --tune)")
    group.add_argument("--tune", metavar="lr|lr,r", help="first search each method's learning rate (and rank: lr,r) "
                       "on the validation split, then train the best setting with every seed and score it on test; "
                       "writes trials.csv and trials.png too")
    group.add_argument("--trials", type=int, help="settings tried per method (default 8): up to 4 a log grid of "
                       "learning rates in [default/10, 10 x default] (with lr,r: each at r = 4, 8, 16), more: optuna "
                       "TPE trials seeded by --seed, median-pruned on the validation scores")
    group.add_argument("--resume", action="store_true", default=None, help="continue a killed --tune search in "
                       "--output-dir: finished trials are kept, the unfinished one runs again")
    add_field_flags(p, RunOptions, exclude=("method", "seed", "resume"))


def _export_flags(p: argparse.ArgumentParser) -> None:
    _adapter_to_folder_flags(p)
    p.add_argument("--format", choices=("peft", "lora"), help="output format (default peft): peft keeps the method "
                   "(HRA, LoRA); lora writes any exactly-linear adapter as a standard PEFT LoRA adapter (vLLM, "
                   "llama.cpp, lm-eval; a pipeline's also as diffusers' pytorch_lora_weights.safetensors)")
    p.add_argument("--head-weights", type=_numbers, help="HydraLoRA with --format lora: the fixed mixture of heads "
                   "to export, comma-separated, summing to 1 (e.g. 0.25,0.25,0.25,0.25); its router is no LoRA")


def _numbers(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5; got {text!r}") from None


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], bool]] = {}


def command(flags: Callable[[argparse.ArgumentParser], None], config: bool = True) -> Callable:
    """Register ``cmd_NAME`` as the subcommand ``NAME``: its docstring is the help (first line) and the
    description (the rest), ``flags`` adds its options, ``config`` adds ``--config FILE.yaml``."""

    def register(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[func.__name__.removeprefix("cmd_")] = (func, flags, config)
        return func

    return register


def build_parser() -> Parser:
    """The ``peftlab`` argument parser: one subcommand per registered ``cmd_*`` function."""
    parser = Parser(prog="peftlab", description="Parameter-efficient fine-tuning: HRA, HydraLoRA, MTLoRA, LoRA.")
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    for name, (func, flags, config) in COMMANDS.items():
        summary, _, description = (func.__doc__ or "").strip().partition("\n")
        p = sub.add_parser(name, help=summary, description=" ".join(description.split()))
        if config:
            p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (long option names as "
                           "keys); flags on the command line override it")
        flags(p)
        p.set_defaults(func=func)
    return parser


REQUIRED = {"merge": ("adapter", "out"), "export": ("adapter", "out")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` fill the options not given on the command line."""
    return apply_config(build_parser().parse_args(argv))


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from ``--config``; check the required ones."""
    config = getattr(args, "config", None)
    if config:
        from peftlab.config_file import read_config

        for key, value in read_config(config, args).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    missing = [name for name in REQUIRED.get(args.command, ()) if getattr(args, name) is None]
    if missing:
        names = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise CLIError(f"the following arguments are required: {names}")
    return args


def run_options(args: argparse.Namespace, **fixed: Any):
    """``RunOptions`` from the parsed flags (only those given; the rest keep their defaults)."""
    from peftlab.recipes.options import RunOptions

    values = {k: v for k, v in vars(args).items() if v is not None}
    values.update(fixed)
    adapter_args = dict(values.pop("adapter_args", None) or [])
    for key in [k for k in values if k.startswith("method_field_")]:  # a method's own flags (--num-heads)
        adapter_args[key.removeprefix("method_field_")] = values.pop(key)
    if adapter_args:
        values["adapter_args"] = adapter_args
    return RunOptions.from_dict(values)


# -- commands: parse, call the library, print -------------------------------------------------------------------
@command(_run_flags)
def cmd_train(args: argparse.Namespace) -> int:
    """train an adapter (or full fine-tuning / a linear probe)

    Train one method on one data set; writes the adapter, metrics.json and training_curve.png to
    --output-dir, with checkpoints to --resume from.
    """
    from peftlab.recipes import train

    train(run_options(args))
    return 0


@command(_eval_flags)
def cmd_eval(args: argparse.Namespace) -> int:
    """metrics of a saved adapter (or model)

    Evaluate a trained run; by default with the model, data and split options it was trained with,
    on the test split. A --data FILE is scored whole (every row), unless --split is given. --task
    multiple-choice scores MMLU-style questions by the log-likelihood of each option (a base --model or any
    run), with per-subject, macro and micro accuracy.
    """
    from peftlab.recipes import evaluate, summary_line

    names = ("text_column", "label_column", *GENERATION_FIELDS, "subjects", "shots", "continuation")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    metrics = evaluate(args.adapter, task=args.task, model=args.model, data=args.data, split=args.split,
                       max_samples=args.max_samples, batch_size=args.batch_size, items_file=args.items, **changes)
    print(json.dumps(metrics, indent=2, default=str))
    print(summary_line(metrics, args.adapter))
    if args.output:
        from peftlab import files

        files.atomic_write_json(args.output, metrics)
    return 0


@command(_compare_flags)
def cmd_compare(args: argparse.Namespace) -> int:
    """several methods and seeds under one budget: a Markdown table and a chart

    Train every method with every seed under the same budget; print a Markdown table (test metric
    mean ± std, trainable parameters, time per step, peak memory) and write compare.md, compare.json
    and compare.png (metric vs trainable parameters). --tune lr first searches each method's learning rate
    on the validation split (trials.csv, trials.png) and compares the chosen ones.
    """
    from peftlab.commands.compare import compare

    methods = args.methods or "hra,lora,full,linear-probe"  # a YAML config may give a list
    methods = [str(m).strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if str(m).strip()]
    first = args.seed or 0
    seeds = list(range(first, first + (args.seeds or 3)))
    lrs: dict[str, float] = {}
    pairs = args.lrs or ""  # "hra=5e-3,lora=1e-3", or a mapping from a YAML config
    items = pairs.split(",") if isinstance(pairs, str) else [f"{k}={v}" for k, v in dict(pairs).items()]
    for item in filter(None, items):
        name, sep, value = item.partition("=")
        try:
            lrs[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise CLIError(f"--lrs expects METHOD=LR pairs like hra=5e-3,lora=1e-3; got {item!r}")
    extra = {k: None for k in ("methods", "seeds", "lrs", "seed", "tune", "trials")}
    options = run_options(argparse.Namespace(**{**vars(args), **extra}))
    if options.output_dir is None:
        options.output_dir = str(Path("runs") / f"compare-{Path(str(options.data or 'default')).stem}")
    if args.tune is None:
        for flag in ("trials", "resume"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag} belongs to a --tune search; add --tune lr (or drop --{flag})")
        compare(options, methods, seeds, lrs)
        return 0
    from peftlab.commands.tune import parse_tune, tune

    keys = parse_tune(args.tune)
    if "r" in keys and args.r is not None:
        raise CLIError("--r fixes the rank, which --tune lr,r searches: drop --r (or tune lr only)")
    tune(options, methods, seeds, keys, 8 if args.trials is None else args.trials, lrs)
    return 0


@command(_adapter_to_folder_flags)
def cmd_merge(args: argparse.Namespace) -> int:
    """fold an adapter into its base model: a plain transformers checkpoint

    Merge the adapter into the base weights (merge_and_unload) and save a plain transformers model with its
    tokenizer (AutoModel*.from_pretrained); a pipeline's adapters give a DiffusionPipeline folder.
    """
    from peftlab.commands import saved

    merged = saved.merge(args.adapter, args.out, args.model, args.overwrite)
    print(f"merged {args.adapter} into {type(merged).__name__}; wrote a plain checkpoint to {args.out}")
    return 0


@command(_export_flags)
def cmd_export(args: argparse.Namespace) -> int:
    """write an adapter in another format (HF PEFT, or a standard LoRA)

    Write the adapter so that peft.PeftModel.from_pretrained(base, OUT) loads it: --format peft keeps the method
    (those HF PEFT has too), --format lora writes any method as an exactly equal LoRA adapter (HydraLoRA with a
    fixed --head-weights). The base model comes from --model or the adapter's config.
    """
    from peftlab.commands import saved

    options = {} if args.head_weights is None else {"head_weights": args.head_weights}
    saved.export(args.adapter, args.out, args.format or "peft", args.model, args.overwrite, **options)
    print(f"exported {args.adapter} in {args.format or 'peft'} format to {args.out}; load it with "
          "peft.PeftModel.from_pretrained(base_model, out) (a pipeline's: out/<component>"
          f"{', or pipe.load_lora_weights(out)' if args.format == 'lora' else ''})")
    return 0


def _generate_flags(p: argparse.ArgumentParser) -> None:
    from peftlab.commands.generate import GenerateOptions

    add_field_flags(p, GenerateOptions, help=GenerateOptions.flag_help())


@command(_generate_flags)
def cmd_generate(args: argparse.Namespace) -> int:
    """images from a text-to-image pipeline with a run's adapters (any diffusers scheduler): each image and a grid"""
    from peftlab.commands.generate import run

    print(run(args))
    return 0


def _analyze_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="adapter folders (or run folders), at least 2")
    p.add_argument("--groups", help="comma-separated group of each run (default: its data name, else its folder name)")
    p.add_argument("--out", default="analysis", help="output folder (default analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis.json / analysis.png in --out")


@command(_analyze_flags, config=False)
def cmd_analyze(args: argparse.Namespace) -> int:
    """t-SNE of the A and B factors of runs on different tasks (HydraLoRA's study); HRA: its reflections

    Write analysis.json (cosine distances of the factors within and between groups, per layer) and analysis.png
    (t-SNE panels) to --out. HRA runs: the mean |cos| between reflection vectors and ‖I − ÛᵀÛ‖_F per layer.
    """
    from peftlab.commands.analyze import analyze

    groups = [g.strip() for g in args.groups.split(",")] if args.groups else None
    print("\n".join(analyze(args.runs, groups, args.out, args.overwrite)))
    return 0


@command(lambda p: p.add_argument("folder", help="adapter folder (or a run's output folder)"), config=False)
def cmd_inspect(args: argparse.Namespace) -> int:
    """config, parameters per module and the method's diagnostics of an adapter

    Print an adapter's config, its parameter count per module and the method's own per-layer
    diagnostics (for HRA the orthogonality ‖I − ÛᵀÛ‖_F of each layer's reflection vectors); with the
    run's metrics.
    """
    from peftlab.commands import saved

    print("\n".join(saved.describe(args.folder)))
    return 0


@command(report_flags, config=False)
def cmd_report(args: argparse.Namespace) -> int:
    """one self-contained HTML page per run, comparison or analysis folder (tables, curves, images embedded)"""
    from peftlab.commands.report import report

    print("\n".join(report(args.folders, args.out, args.spectrum)))
    return 0


def _serve_module():  # imported on use: FastAPI and uvicorn load only for `peftlab serve`
    from peftlab.commands import serve
    return serve


@command(lambda p: _serve_module().add_flags(p), config=False)
def cmd_serve(args: argparse.Namespace) -> int:
    """serve adapters of one base model over HTTP; concurrent requests run as mixed-adapter batches"""
    return _serve_module().main(args)


def _estimate_flags(p: argparse.ArgumentParser) -> None:
    from peftlab.cli_flags import _key_value
    from peftlab.estimate import PRECISIONS, QUANTIZATIONS

    p.add_argument("--model", required=True, help="a folder with config.json (or unet/config.json), a .json file, "
                   "or a Hub id (needs a network); e.g. configs/models/llama-2-7b.json")
    add_method_flags(p)
    p.add_argument("--r", type=positive_int, default=8, help="adapter rank (default 8)")
    p.add_argument("--target-modules", help="comma-separated layer names, a regex or all-linear (default: the "
                   "method's defaults, as peftlab train)")
    p.add_argument("--adapter-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="another field of the method's config (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="per-device batch size (default 4)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per example (default 512)")
    p.add_argument("--resolution", type=positive_int, help="UNet: image size in pixels (default sample_size·8)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16",
                   help="dtype of the base weights and activations; adapters stay fp32 (default bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="keep only each layer's input")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="bitsandbytes base: nf4, nf4-double (double quant) or int8 (default none)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--fsdp", action="store_true", help="FSDP full shard (counted as ZeRO-3)")
    p.add_argument("--num-devices", type=int, default=1, help="data-parallel devices (default 1)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")


@command(_estimate_flags, config=False)
def cmd_estimate(args: argparse.Namespace) -> int:
    """memory per device of training an adapter, from a model's config.json (no weights)

    Builds the model on the meta device, puts the adapter on it, and prints the bytes of the base weights,
    adapter weights, gradients, AdamW states, activations and logits per device (not counted: CUDA context,
    allocator fragmentation, temporary buffers).
    """
    from peftlab.estimate import estimate_memory

    adapter_args = dict(args.adapter_arg or [])
    adapter_args.update({k.removeprefix("method_field_"): v for k, v in vars(args).items()
                         if k.startswith("method_field_") and v is not None})
    result = estimate_memory(args.model, args.method or "hra", args.r, args.target_modules, args.batch_size,
                             args.seq_len, args.resolution, args.precision, args.gradient_checkpointing,
                             args.quantization, args.zero_stage, args.fsdp, args.num_devices, adapter_args)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


# -- entry point --------------------------------------------------------------------------------------------------
def yaml_error() -> type[Exception]:
    import yaml

    return yaml.YAMLError


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (2 for bad input)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "peftlab"
    try:
        args = build_parser().parse_args(argv)
        command = f"peftlab {args.command}"
        return args.func(apply_config(args))
    except SystemExit as exit_:  # --help, --version and argparse usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{command}: interrupted; `peftlab train --resume` continues from the last checkpoint", file=sys.stderr)
        return 130
    except (PeftlabError, yaml_error()) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
