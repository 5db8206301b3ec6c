"""What can be done with a finished run: load it for inference, merge it, export it, describe it.

Each function takes the run's folder (an adapter folder written by ``peftlab train``, or a full model
folder) and returns data; :mod:`peftlab.cli` prints it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from peftlab import files
from peftlab.config import AdapterConfig
from peftlab.errors import AdapterLoadError, RecipeError
from peftlab.methods.base import ADAPTERS, config_mismatch
from peftlab.recipes.rundir import METRICS_FILE, is_adapter_dir, read_run


def check_out(out: str | os.PathLike, overwrite: bool | None) -> Path:
    """The output folder of merge / export: refused if it is a file, or a non-empty folder without ``overwrite``."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"--out {out} exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RecipeError(f"--out {out} is not empty; pass --overwrite to write into it, or choose another folder")
    return path


def load_for_inference(adapter: str | os.PathLike, model: str | None) -> tuple[nn.Module, Any]:
    """(model with adapter, tokenizer) of an adapter folder, with the task's model class."""
    from peftlab.recipes import task_of

    if not is_adapter_dir(adapter):
        what = "a full model" if (Path(adapter) / "config.json").is_file() else "no adapter_config.json"
        raise RecipeError(f"{adapter} holds no adapter ({what}); merge and export need an adapter folder "
                          "written by peftlab train")
    if task_of(adapter) == "classification":
        from peftlab.recipes.text.classification import load_trained

        net, tokenizer, _ = load_trained(adapter, model)
        return net, tokenizer
    from peftlab.recipes.text.lm import load_trained

    return load_trained(adapter, model)


def is_pipeline_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a diffusers pipeline's adapters (see :mod:`peftlab.diffusion.pipeline`)."""
    return (Path(folder) / "pipeline.json").is_file()


def merge(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
          overwrite: bool | None = None) -> Any:
    """Fold the adapter into its base model and save a plain transformers checkpoint (+ tokenizer) in ``out``;
    a pipeline's adapters (``pipeline.json``) give a plain diffusers pipeline folder."""
    from peftlab.base_models import quiet_transformers

    path = check_out(out, overwrite)
    if is_pipeline_dir(adapter):
        from peftlab.diffusion.pipeline import merge_folder

        return merge_folder(adapter, path, model)
    net, tokenizer = load_for_inference(adapter, model)
    merged = net.merge_and_unload(safe_merge=True)
    with quiet_transformers():
        merged.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return merged


def export(adapter: str | os.PathLike, out: str | os.PathLike, format: str = "peft", model: str | None = None,
           overwrite: bool | None = None, **options: Any) -> None:
    """Write the adapter in another format to ``out``: ``peft`` (the method's own PEFT format) or ``lora`` (a PEFT
    LoRA adapter, :mod:`peftlab.lora_export`; ``options``: HydraLoRA's ``head_weights``)."""
    path = check_out(out, overwrite)
    if format == "lora":
        if is_pipeline_dir(adapter):
            from peftlab.diffusion.pipeline import load_pipeline_adapters, to_lora_pipeline

            to_lora_pipeline(load_pipeline_adapters(adapter, model), path, **options)
        else:
            load_for_inference(adapter, model)[0].to_lora(save_directory=path, **options)
        return
    if options:
        raise RecipeError(f"{sorted(options)} apply to --format lora only")
    if is_pipeline_dir(adapter):  # one folder per component, and pipeline.json
        from peftlab.diffusion.pipeline import export_folder

        export_folder(adapter, path, format, model)
        return
    net, _ = load_for_inference(adapter, model)
    net.save_pretrained(path, format=format)


def describe(folder: str | os.PathLike) -> list[str]:
    """Lines describing a run or adapter folder: the run's options, the adapter config, parameters per
    module, the method's own per-layer diagnostics (e.g. HRA's orthogonality), and the test metric."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecipeError(f"{folder} is not a folder")
    lines: list[str] = []
    if is_pipeline_dir(folder):  # a pipeline's adapters: each component's adapter folder
        data = files.read_json(folder / "pipeline.json")
        lines.append(f"pipeline adapters: base {data.get('base_model')}, components {data.get('components')}")
        for name in data.get("components") or []:
            lines += [f"[{name}]", *describe(folder / str(name))]
        return lines
    run = read_run(folder)
    if run and "options" in run:
        o = run["options"]
        lines.append(f"run: task={o.get('task')} method={o.get('method')} model={o.get('model')} data={o.get('data')} "
                     f"r={o.get('r')} lr={o.get('lr')} seed={o.get('seed')}")
    adapter = is_adapter_dir(folder)
    if adapter:
        data = files.read_json(folder / files.CONFIG_NAME)
        config = AdapterConfig.from_dict({k: v for k, v in data.items() if k != "base_model_name_or_path"})
        tensors = files.load_tensors(folder)
        reason = config_mismatch(config, tensors)
        if reason is not None:
            raise AdapterLoadError(f"{folder} cannot be loaded: {reason}")
        lines.append("adapter config:")
        lines += [f"  {key}: {json.dumps(data[key])}" for key in sorted(data)]
    elif (folder / "config.json").is_file():
        from safetensors.torch import load_file

        data = files.read_json(folder / "config.json")
        lines.append(f"full model: {', '.join(data.get('architectures') or [data.get('model_type', '?')])}")
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(file)))
    else:
        raise RecipeError(f"{folder} holds neither an adapter ({files.CONFIG_NAME}) nor a model (config.json)")
    lines += parameter_lines(tensors, full=not adapter)
    if adapter:
        lines += diagnostic_lines(config, tensors)
    metrics_file = folder / METRICS_FILE
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        metric = metrics.get("metric")
        value = (metrics.get("test") or {}).get(metric)
        lines.append(f"metrics: test {metric} = {value:.4f}" if isinstance(value, float) else
                     f"metrics: test {metric} = {value}")
        lines[-1] += f", trainable params {metrics.get('trainable_params'):,}, global step {metrics.get('global_step')}"
    return lines


def parameter_lines(tensors: dict[str, Any], full: bool) -> list[str]:
    """Parameter count per module (a whole model: per first two name levels)."""
    groups: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
    for key in sorted(tensors):
        module, _, name = key.rpartition(".")
        if full:
            module = ".".join(key.split(".")[:-1][:2]) or key
        groups.setdefault(module, []).append((name, tuple(tensors[key].shape), tensors[key].numel()))
    total = sum(n for entries in groups.values() for *_, n in entries)
    lines = [f"parameters per module ({len(groups)} modules, {total:,} in all):"]
    width = max(map(len, groups), default=0)
    for module, entries in groups.items():
        detail = ", ".join(f"{name} {list(shape)}" for name, shape, _ in entries) if not full else ""
        lines.append(f"  {module:<{width}}  {sum(n for *_, n in entries):>12,}  {detail}".rstrip())
    return lines


def diagnostic_lines(config: AdapterConfig, tensors: dict[str, Any]) -> list[str]:
    """The method's own per-layer numbers (``Adapter.diagnostics`` of each layer's saved tensors)."""
    adapter_cls = ADAPTERS.get(config.method)
    if adapter_cls is None:
        return []
    rows = {module: found for module, state in files.by_module(tensors).items()
            if (found := adapter_cls.diagnostics(state))}
    if not rows:
        return []
    lines = []
    width = max(map(len, rows))
    for name in dict.fromkeys(k for found in rows.values() for k in found):
        lines.append(f"{config.method} {name} per layer:")
        lines += [f"  {module:<{width}}  {found[name]:.4f}" for module, found in rows.items() if name in found]
    return lines
