"""The model side of :mod:`peftlab.estimate`: a ``config.json`` read, the model built on the meta device (shapes
and dtypes, no storage), peftlab's adapter put on it, and the tensors autograd would save traced on meta.

Nothing here allocates weights: ``with torch.device("meta")`` builds every parameter without data, and a
forward pass on meta tensors computes only shapes, so the saved-for-backward tensors of a 7B layer or a whole
Stable Diffusion UNet are counted in seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, ModelError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

UNET_CLASS = "UNet2DConditionModel"
# Layers that read the same input tensor: an adapter that saves its (uncast) input saves it once for the group.
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"},
                 {"wq", "wk", "wv"}, {"w1", "w3"})


def read_model_config(model: str | Path) -> dict[str, Any]:
    """The ``config.json`` of ``model``: a folder (its ``config.json``, else ``unet/config.json``), a ``.json``
    file, or, with a network, a Hub id read through ``transformers.AutoConfig``."""
    path = Path(model)
    if path.is_dir():
        for candidate in (path / "config.json", path / "unet" / "config.json"):
            if candidate.is_file():
                return _read_json(candidate)
        raise ModelError(f"{path} has no config.json (nor unet/config.json); give a model folder or a config.json "
                         "file, e.g. configs/models/llama-2-7b.json")
    if path.suffix == ".json" or path.exists() or str(model).startswith((".", "/")):
        if not path.is_file():
            raise ModelError(f"config file {path} does not exist; give a model folder or a config.json file, "
                             "e.g. configs/models/llama-2-7b.json")
        return _read_json(path)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model)).to_dict()
    except Exception as err:  # offline, unknown id, no config.json on the Hub
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{model!r} is not a local folder or .json file, and transformers.AutoConfig could not "
                         f"read it from the Hub ({first}); give a folder or a config.json file") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a model config (a JSON object with the architecture's fields)")
    return data


def is_unet(config: dict[str, Any]) -> bool:
    """Whether ``config`` describes a diffusers ``UNet2DConditionModel``."""
    return config.get("_class_name") == UNET_CLASS or {"block_out_channels", "cross_attention_dim"} <= set(config)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def build_meta_model(config: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model on the meta device in ``dtype``, its config object). Decoder LMs come from
    ``AutoModelForCausalLM.from_config`` (``AutoModel`` for other architectures), UNets from
    ``UNet2DConditionModel.from_config``."""
    with _quiet(), torch.device("meta"):
        if is_unet(config):
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
            return model.to(dtype), model.config
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        if "model_type" not in config:
            raise ModelError("the config.json has no 'model_type' (e.g. \"llama\") and is not a diffusers UNet "
                             "config; use the config.json of a transformers or diffusers model")
        try:
            hf_config = AutoConfig.for_model(**config)
        except (ValueError, KeyError) as err:
            raise ModelError(f"transformers cannot build a config of model_type {config['model_type']!r}: "
                             f"{err}") from None
        try:
            model = AutoModelForCausalLM.from_config(hf_config)
        except ValueError:  # not a causal LM (an encoder, a seq2seq model)
            model = AutoModel.from_config(hf_config)
    return model.to(dtype), hf_config


def adapter_config(method: str, model: nn.Module, r: int, target_modules: list[str] | str | None,
                   adapter_args: dict[str, Any] | None, unet: bool) -> AdapterConfig:
    """The config ``peftlab train`` would build: the method's defaults, the model's default targets (the
    attention query/value projections; UNets: the DreamBooth targets of :mod:`peftlab.diffusion.pipeline`)."""
    from peftlab.recipes.adapters import build_adapter_config, method_spec

    spec = method_spec(method)
    if spec.config_class is None:
        raise ConfigError(f"method {method!r} trains no adapter; peftlab estimate covers the adapter methods")
    if unet and not target_modules:
        from peftlab.diffusion.pipeline import default_targets

        target_modules = default_targets("unet", model, spec.config_class.method)
    config = build_adapter_config(method, model, r, target_modules, options=adapter_args)
    assert config is not None
    if config.unresolved_fields():
        raise ConfigError(f"{method}: {config.unresolved_fields()} depend on the training data; give a number "
                          "(e.g. --num-heads 4) for the estimate")
    return config


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@contextlib.contextmanager
def saved_storages(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Inside the block, every tensor autograd saves for backward is recorded as {storage: bytes} (one entry per
    storage: views of one tensor count once), except the storages in ``exclude`` (the parameters)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in exclude:
            seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """What one adapted layer saves for backward, for ``tokens`` tokens: the input itself (shared with
    the other layers that read it, when saved without a cast) and everything else."""

    input_bytes: int
    other_bytes: int


def trace_adapted_linear(config: AdapterConfig, d_in: int, d_out: int, r: int, tokens: int,
                         dtype: torch.dtype) -> LayerTrace:
    """Saved-for-backward bytes of a frozen ``Linear(d_in, d_out)`` in ``dtype`` carrying ``config``'s adapter
    (rank ``r``, fp32 parameters), for an input of ``tokens`` rows that requires grad (as inside a network)."""
    from peftlab.model import get_adapter_model

    with torch.device("meta"):
        layer = nn.Sequential(nn.Linear(d_in, d_out, bias=False, dtype=dtype))
    one = dataclasses.replace(config, r=r, target_modules=["0"], rank_pattern={}, modules_to_save=None,
                              layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    model = get_adapter_model(layer, one)  # adapter initialised on the CPU (r × d values), then moved to meta
    model.train()
    x = torch.empty(tokens, d_in, device="meta", dtype=dtype, requires_grad=True)
    with saved_storages({_storage_key(p) for p in model.parameters()}) as seen:
        model(x)
    own = seen.pop(_storage_key(x), 0)
    return LayerTrace(own, sum(seen.values()))


class _FusedAttention(torch.autograd.Function):
    """Shapes of ``scaled_dot_product_attention`` on meta, saving what a fused kernel (flash / memory-efficient)
    saves for backward: q, k, v, the output and the fp32 log-sum-exp per query; never the a·s² scores, which the
    math fallback that meta tensors would run keeps."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Inside the block, ``F.scaled_dot_product_attention`` saves for backward what a fused kernel saves."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FusedAttention.apply(q, k, v)
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def trace_unet(model: nn.Module, batch: int, latent: int, dtype: torch.dtype) -> int:
    """Saved-for-backward bytes of one training forward of a UNet (with its adapters) on meta: ``batch`` noisy
    latents of ``latent × latent`` pixels, a timestep each, text states of 77 tokens; attention as a fused
    kernel keeps it (:func:`fused_attention`)."""
    config = model.config
    sample = torch.empty(batch, config.in_channels, latent, latent, device="meta", dtype=dtype)
    text = torch.empty(batch, 77, config.cross_attention_dim, device="meta", dtype=dtype)
    steps = torch.zeros(batch, dtype=torch.long, device="meta")
    model.train()
    with fused_attention(), saved_storages({_storage_key(p) for p in model.parameters()}) as seen:
        model(sample, steps, encoder_hidden_states=text)
    return sum(seen.values())


def shared_group(name: str) -> frozenset[str] | None:
    """The group of sibling layers reading the same input as layer ``name`` (``q_proj`` → q, k, v)."""
    leaf = name.rsplit(".", 1)[-1]
    return next((frozenset(g) for g in SHARED_INPUTS if leaf in g), None)


def measure_training_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Measured peak bytes of live CPU tensors over one training step (forward, backward, AdamW step) of
    ``model`` on ``batch``, after one warm-up step (so AdamW's states exist, as in a running job).

    The peak is the bytes of the storages alive before the step (parameters, buffers, AdamW states) plus the
    highest running sum of the allocations and frees torch.profiler records (``profile_memory=True``) in it."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()
    tensors = [*model.parameters(), *model.buffers(), *batch.values(),
               *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
    alive = sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return alive + peak


def measured_peak(config: dict[str, Any], method: str, r: int, batch_size: int, seq_len: int, precision: str,
                  gradient_checkpointing: bool, seed: int = 0) -> int:
    """:func:`measure_training_step` of a real (random) causal LM built from ``config`` on the CPU, with the
    adapter ``peftlab estimate`` assumes (same method, rank, default targets), in ``precision``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.model import get_adapter_model

    torch.manual_seed(seed)
    with _quiet():
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to(PRECISIONS[precision])
    model = get_adapter_model(base, adapter_config(method, base, r, None, None, unet=False))
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len))
    return measure_training_step(model, {"input_ids": ids, "labels": ids})


class _DenoisingLoss(nn.Module):
    """A UNet's training forward for :func:`measure_training_step`: predict the noise, mean squared error."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, steps: torch.Tensor, text: torch.Tensor, noise: torch.Tensor) -> Any:
        prediction = self.unet(sample, steps, encoder_hidden_states=text).sample
        return types.SimpleNamespace(loss=nn.functional.mse_loss(prediction, noise))


def measured_unet_peak(config: dict[str, Any], method: str, r: int, batch_size: int, seed: int = 0) -> int:
    """:func:`measure_training_step` of a real (random) fp32 UNet built from ``config`` on the CPU, with the
    adapter ``peftlab estimate`` assumes, on ``batch_size`` latents of ``sample_size``² and 77 text tokens."""
    from diffusers import UNet2DConditionModel

    from peftlab.model import get_adapter_model

    torch.manual_seed(seed)
    with _quiet():
        unet = UNet2DConditionModel.from_config(config)
    model = get_adapter_model(unet, adapter_config(method, unet, r, None, None, unet=True))
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    batch = {"sample": torch.randn(shape), "steps": torch.randint(0, 1000, (batch_size,)),
             "text": torch.randn(batch_size, 77, unet.config.cross_attention_dim), "noise": torch.randn(shape)}
    return measure_training_step(_DenoisingLoss(model), batch)
