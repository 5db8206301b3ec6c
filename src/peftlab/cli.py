"""``peftlab``: train, evaluate, compare, merge, export and inspect adapters from the command line.

    peftlab train   --model minilm --data movie-snippets --method hra --r 8 --output-dir runs/hra
    peftlab eval    --adapter runs/hra [--model minilm] [--data movie-snippets]
    peftlab compare --model minilm --data movie-snippets --methods hra,lora,full,linear-probe --seeds 3
    peftlab merge   --adapter runs/hra --out merged/          (a plain transformers checkpoint)
    peftlab export  --adapter runs/hra --format peft --out peft-adapter/
    peftlab inspect runs/hra

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from peftlab._version import __version__
from peftlab.errors import PeftlabError
from peftlab.errors import UsageError as CLIError

EXIT_BAD_INPUT = 2




class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- options ------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _num_heads(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    import yaml

    return key.strip().replace("-", "_"), yaml.safe_load(value)


def _add_run_options(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """The options of a training run (``RunOptions``); every default is ``None`` = the task's default."""
    from peftlab.recipes.common import METHOD_SPECS, TASK_DEFAULTS, TASKS

    data = p.add_argument_group("data and model")
    data.add_argument("--task", choices=TASKS, help="what to train (default: classification)")
    models = ", ".join(f"{t}: {d['model']}" for t, d in TASK_DEFAULTS.items())
    datas = ", ".join(f"{t}: {d['data']}" for t, d in TASK_DEFAULTS.items())
    data.add_argument("--model", help=f"model name (minilm, smollm2-135m), local folder or Hub name (default {models})")
    data.add_argument("--data", help=f"data set name or file (default {datas})")
    data.add_argument("--text-column", help="text column(s) of a data file, e.g. 'sentence1,sentence2' (default text)")
    data.add_argument("--label-column", help="label column of a data file (default label)")
    data.add_argument("--num-labels", type=_positive_int, help="number of classes; labels must be 0..N-1")
    data.add_argument("--glue-task", help="GLUE task name: its text columns and metrics (cola, sst2, mrpc, stsb, ...)")
    data.add_argument("--max-length", type=_positive_int, help="tokens per example (default 64 / 256 / 128 by task)")
    data.add_argument("--max-train-samples", type=_positive_int, help="use at most N training examples")
    data.add_argument("--max-eval-samples", type=_positive_int, help="validation examples per evaluation (default 500)")
    data.add_argument("--max-test-samples", type=_positive_int, help="test examples (or MRs) scored at the end")
    data.add_argument("--split-seed", type=int, help="seed of the train/validation/test split (default 0)")

    method = p.add_argument_group("method")
    if not compare:
        method.add_argument("--method", choices=list(METHOD_SPECS),
                            help="adapter method (default hra): " + "; ".join(
                                f"{n}: {s.description} (lr {s.lr:g})" for n, s in METHOD_SPECS.items()))
    method.add_argument("--r", type=_positive_int, help="adapter rank / number of reflections (default 8)")
    method.add_argument("--target-modules", help="comma-separated layer names, a regex or 'all-linear' "
                        "(default: the attention query/value projections)")
    method.add_argument("--num-heads", type=_num_heads,
                        help="HydraLoRA heads: a number, or 'auto' (estimate_num_heads on the training texts)")
    method.add_argument("--structure", choices=("shim", "icfm", "ctcm", "dtsm"),
                        help="MTLoRA's transformation T: shim C, icfm C·Cᵀ, ctcm C·D, dtsm C + D (default shim)")
    method.add_argument("--adapter-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                        help="another field of the method's config, e.g. alpha=16 or orthogonality_weight=1e-4 "
                        "(repeatable)")

    budget = p.add_argument_group("training")
    budget.add_argument("--lr", type=float, help="learning rate (default: the method's, e.g. hra 1e-2, lora 3e-3)")
    budget.add_argument("--epochs", type=float, help="epochs (default 1) unless --max-steps is given")
    budget.add_argument("--max-steps", type=_positive_int, help="optimizer steps (overrides --epochs)")
    budget.add_argument("--batch-size", type=_positive_int, help="per-device batch size (default 32 / 8 / 8 by task)")
    budget.add_argument("--eval-batch-size", type=_positive_int, help="evaluation batch size (default 2x batch size)")
    budget.add_argument("--eval-steps", type=_positive_int, help="evaluate and checkpoint every N steps (default 50)")
    budget.add_argument("--warmup", type=float, help="warm-up steps, or a fraction of the run if < 1 (default 0.06)")
    budget.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    budget.add_argument("--label-smoothing", type=float, help="label smoothing (default 0; MTLoRA on E2E: 0.1)")
    if not compare:
        budget.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
        budget.add_argument("--resume", action="store_true", default=None,
                            help="continue from the last checkpoint in --output-dir")
    budget.add_argument("--output-dir", help="where the run goes (default runs/<task>-<method>-<data>)")
    budget.add_argument("--overwrite", action="store_true", default=None,
                        help="replace an earlier run in --output-dir (never done without it)")
    budget.add_argument("--no-initial-eval", dest="initial_eval", action="store_false", default=None,
                        help="skip the step-0 evaluation of the untrained model")
    _add_generation_options(p)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    gen = p.add_argument_group("generation (causal-lm, data-to-text)")
    gen.add_argument("--max-new-tokens", type=_positive_int, help="tokens generated per example (default 64)")
    gen.add_argument("--num-beams", type=_positive_int, help="beam size (default 1; data-to-text 10)")
    gen.add_argument("--length-penalty", type=float, help="beam-search length penalty (default 0.9)")
    gen.add_argument("--no-repeat-ngram-size", type=int, help="forbid repeated n-grams in beam search (default 4)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (long option names as keys); "
                   "flags on the command line override it")


def build_parser() -> Parser:
    """The ``peftlab`` argument parser with its subcommands."""
    parser = Parser(prog="peftlab", description="Parameter-efficient fine-tuning: HRA, HydraLoRA, MTLoRA, LoRA.")
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)

    p = sub.add_parser("train", help="train an adapter (or full fine-tuning / a linear probe)",
                       description="Train one method on one data set; writes the adapter, metrics.json and "
                       "training_curve.png to --output-dir, with checkpoints to --resume from.")
    _add_config(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a saved adapter (or model)",
                       description="Evaluate a trained run; by default with the model, data and split options it "
                       "was trained with, on the test split.")
    _add_config(p)
    p.add_argument("--adapter", required=False, help="the run's output folder (adapter or full model)")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--data", help="data set name or file (default: the training data's test split)")
    p.add_argument("--task", help="task, when the folder does not record it")
    p.add_argument("--split", choices=("test", "validation", "train"), help="split to score (default test)")
    p.add_argument("--max-samples", type=_positive_int, help="score at most N examples")
    p.add_argument("--batch-size", type=_positive_int, help="evaluation batch size")
    p.add_argument("--text-column", help="text column(s) of a data file")
    p.add_argument("--label-column", help="label column of a data file")
    p.add_argument("--output", metavar="FILE.json", help="also write the metrics to this JSON file")
    _add_generation_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="several methods and seeds under one budget: a Markdown table and a chart",
                       description="Train every method with every seed under the same budget; print a Markdown "
                       "table (test metric mean ± std, trainable parameters, time per step, peak memory) and write "
                       "compare.md, compare.json and compare.png (metric vs trainable parameters).")
    _add_config(p)
    p.add_argument("--methods", help="comma-separated methods (default hra,lora,full,linear-probe); a method may carry "
                   "config fields as METHOD:KEY=VALUE[:KEY=VALUE], e.g. mtlora-shim:init=identity")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds, starting at --seed (default 3)")
    p.add_argument("--seed", type=int, help="first seed (default 0)")
    p.add_argument("--lrs", help="per-method learning rates, e.g. hra=5e-3,lora=1e-3 (others: --lr or defaults)")
    _add_run_options(p, compare=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("merge", help="fold an adapter into its base model: a plain transformers checkpoint",
                       description="Merge the adapter into the base weights (merge_and_unload) and save a plain "
                       "transformers model with its tokenizer, loadable with AutoModel*.from_pretrained.")
    _add_config(p)
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--overwrite", action="store_true", default=None, help="write into a non-empty --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write an adapter in another format (HF PEFT)",
                       description="Write the adapter so that peft.PeftModel.from_pretrained(base, OUT) loads it "
                       "(HRA and LoRA). The base model comes from --model or the adapter's config.")
    _add_config(p)
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--format", choices=("peft",), help="output format (default peft)")
    p.add_argument("--model", help="base model (default: base_model_name_or_path of the adapter config)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--overwrite", action="store_true", default=None, help="write into a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="config, parameters per module, HRA orthogonality of a saved adapter",
                       description="Print an adapter's config, its parameter count per module and, for HRA, the "
                       "orthogonality ‖I − ÛᵀÛ‖_F of each layer's reflection vectors; with the run's metrics.")
    p.add_argument("folder", help="adapter folder (or a run's output folder)")
    p.set_defaults(func=cmd_inspect)
    return parser


REQUIRED = {"eval": ("adapter",), "merge": ("adapter", "out"), "export": ("adapter", "out")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` fill the options not given on the command line."""
    return apply_config(build_parser().parse_args(argv))


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from ``--config``; check the required ones."""
    config = getattr(args, "config", None)
    if config:
        for key, value in _read_config(config, args).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    missing = [name for name in REQUIRED.get(args.command, ()) if getattr(args, name) is None]
    if missing:
        names = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise CLIError(f"the following arguments are required: {names}")
    return args


def _read_config(path: str, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CLIError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"--config {path} must hold a mapping of option names to values, not {type(data).__name__}")
    valid = set(vars(args)) - {"func", "command", "config"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "adapter_args" and isinstance(value, dict) and "adapter_arg" in valid:
            name, value = "adapter_arg", [(str(k), v) for k, v in value.items()]
        elif name == "no_initial_eval" and "initial_eval" in valid:
            name, value = "initial_eval", not value
        if name not in valid:
            raise CLIError(f"--config {path}: unknown option {key!r}; valid: {', '.join(sorted(valid))}")
        out[name] = value
    return out


def run_options(args: argparse.Namespace, **fixed: Any):
    """``RunOptions`` from the parsed flags (only those given; the rest keep their defaults)."""
    from peftlab.recipes.common import RunOptions

    values = {k: v for k, v in vars(args).items() if v is not None}
    values.update(fixed)
    adapter_args = dict(values.pop("adapter_arg", None) or [])
    for name in ("num_heads", "structure"):  # method options with a flag of their own
        value = values.pop(name, None)
        if value is not None:
            adapter_args[name] = value
    if adapter_args:
        values["adapter_args"] = adapter_args
    return RunOptions.from_dict(values)


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.recipes import train

    train(run_options(args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.recipes import evaluate

    names = ("text_column", "label_column", "max_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    metrics = evaluate(args.adapter, task=args.task, model=args.model, data=args.data, split=args.split or "test",
                       max_samples=args.max_samples, batch_size=args.batch_size, **overrides)
    split = metrics["split"]
    scores = metrics[split]
    print(json.dumps(metrics, indent=2, default=str))
    main_metric = metrics["metric"]
    print(f"{split} {main_metric} of {args.adapter} on {metrics['data']}: "
          f"{_fmt(scores.get(main_metric))} ({metrics.get('num_examples', metrics.get('num_mrs'))} examples)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from peftlab.recipes import compare

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
    extra = {k: None for k in ("methods", "seeds", "lrs", "seed")}
    options = run_options(argparse.Namespace(**{**vars(args), **extra}))
    if options.output_dir is None:
        options.output_dir = str(Path("runs") / f"compare-{Path(str(options.data or 'default')).stem}")
    compare(options, methods, seeds, lrs)
    return 0


def _check_out(out: str, overwrite: bool | None) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out} exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"--out {out} is not empty; pass --overwrite to write into it, or choose another folder")
    return path


def _load_for_inference(adapter: str, model: str | None):
    """(model with adapter, tokenizer) of an adapter folder, with the task's model class."""
    from peftlab.recipes import common, task_of

    if not common.is_adapter_dir(adapter):
        what = "a full model" if (Path(adapter) / "config.json").is_file() else "no adapter_config.json"
        raise CLIError(f"{adapter} holds no adapter ({what}); merge and export need an adapter folder "
                       "written by peftlab train")
    task = task_of(adapter)
    if task == "classification":
        from peftlab.recipes.classification import load_trained

        net, tokenizer, _ = load_trained(adapter, model)
    else:
        from peftlab.recipes.causal_lm import load_trained

        net, tokenizer = load_trained(adapter, model)
    return net, tokenizer


def cmd_merge(args: argparse.Namespace) -> int:
    out = _check_out(args.out, args.overwrite)
    from peftlab.models import quiet_transformers

    net, tokenizer = _load_for_inference(args.adapter, args.model)
    merged = net.merge_and_unload(safe_merge=True)
    with quiet_transformers():
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"merged {args.adapter} into {type(merged).__name__}; wrote a plain transformers checkpoint to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = _check_out(args.out, args.overwrite)
    net, _ = _load_for_inference(args.adapter, args.model)
    try:
        net.save_pretrained(out, format=args.format or "peft")
    except NotImplementedError as err:
        raise CLIError(str(err)) from None
    print(f"exported {args.adapter} in {args.format or 'peft'} format to {out}; load it with "
          "peft.PeftModel.from_pretrained(base_model, out)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from peftlab import io
    from peftlab.recipes import common

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder")
    run = common.read_run(folder)
    if run and "options" in run:
        o = run["options"]
        print(f"run: task={o.get('task')} method={o.get('method')} model={o.get('model')} data={o.get('data')} "
              f"r={o.get('r')} lr={o.get('lr')} seed={o.get('seed')}")
    if common.is_adapter_dir(folder):
        config = io.read_json(folder / io.CONFIG_NAME)
        tensors = io.load_tensors(folder)
        print("adapter config:")
        for key in sorted(config):
            print(f"  {key}: {json.dumps(config[key])}")
    elif (folder / "config.json").is_file():
        from safetensors.torch import load_file

        config = io.read_json(folder / "config.json")
        print(f"full model: {', '.join(config.get('architectures') or [config.get('model_type', '?')])}")
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(file)))
    else:
        raise CLIError(f"{folder} holds neither an adapter ({io.CONFIG_NAME}) nor a model (config.json)")
    _print_parameters(tensors, full=not common.is_adapter_dir(folder))
    if common.is_adapter_dir(folder) and config.get("method") == "hra":
        _print_orthogonality(tensors)
    metrics_file = folder / common.METRICS_FILE
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        metric = metrics.get("metric")
        test = metrics.get("test") or {}
        print(f"metrics: test {metric} = {_fmt(test.get(metric))}, trainable params "
              f"{metrics.get('trainable_params'):,}, global step {metrics.get('global_step')}")
    return 0


def _print_parameters(tensors: dict[str, Any], full: bool) -> None:
    groups: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
    for key in sorted(tensors):
        module, _, name = key.rpartition(".")
        if full:  # a whole model: group by the first two levels of the module name
            module = ".".join(key.split(".")[:-1][:2]) or key
        groups.setdefault(module, []).append((name, tuple(tensors[key].shape), tensors[key].numel()))
    total = sum(n for entries in groups.values() for *_, n in entries)
    print(f"parameters per module ({len(groups)} modules, {total:,} in all):")
    width = max(map(len, groups), default=0)
    for module, entries in groups.items():
        detail = ", ".join(f"{name} {list(shape)}" for name, shape, _ in entries) if not full else ""
        print(f"  {module:<{width}}  {sum(n for *_, n in entries):>12,}  {detail}".rstrip())


def _print_orthogonality(tensors: dict[str, Any]) -> None:
    from peftlab.methods.hra import orthogonality_penalty

    print("HRA orthogonality ‖I − ÛᵀÛ‖_F per layer (0 = orthonormal reflection vectors):")
    layers = {k.rpartition(".")[0]: v for k, v in tensors.items() if k.endswith(".hra_u")}
    width = max(map(len, layers), default=0)
    for name, u in layers.items():
        print(f"  {name:<{width}}  {float(orthogonality_penalty(u.float()).sqrt()):.4f}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


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
