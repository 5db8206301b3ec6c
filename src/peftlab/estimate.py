"""Memory per device for training an adapter, from a model's ``config.json`` alone (``peftlab estimate``).

The model is built on the meta device (no weights), peftlab's own injection puts the adapter on it, so the
trainable parameters are counted exactly for every registered method. With P base parameters, T trainable
(adapter) parameters, N devices, p the bytes of the compute dtype (4 fp32, 2 bf16 / fp16):

- **base weights**: P·p, except that a 4-/8-bit base (bitsandbytes) stores every frozen ``nn.Linear`` weight
  but the output head quantized: NF4 0.5 byte/weight + one fp32 absmax per 64-weight block (double quant:
  the absmax in 8 bits, + one fp32 per 256 absmax); int8 1 byte/weight + one fp32 scale per output row.
  Embeddings, norms, biases and ``lm_head`` stay in the compute dtype.
- **adapter weights** 4·T (adapters train in fp32: they are their own master copy), **gradients** 4·T,
  **AdamW states** 8·T (exp_avg, exp_avg_sq). (DeepSpeed's bf16 mode keeps 2 + 2 + 12 bytes instead: the same.)
- **sharding**: ZeRO-1 divides the AdamW states by N, ZeRO-2 also the gradients, ZeRO-3 / FSDP full shard also
  every weight, and adds the largest block (layer) gathered whole during its forward / backward.
- **activations** of a decoder LM (t = batch·length tokens; Korthikanti et al. 2022's per-layer count
  s·b·h·(34 + 5·a·s/h), adapted to Llama-style layers with a frozen base): a frozen Linear keeps nothing for
  its input gradient, so per layer autograd keeps the two RMSNorm inputs in fp32 (8·t·h), SDPA's q, k, v and
  output (p·t·(2·a·d + 2·a_kv·d); SDPA / flash attention keeps no a·s² score matrix), the gated MLP's gate, up
  and act(gate) (3·p·t·i; 2·p·t·i without a gate); plus what each adapted layer keeps, traced on meta
  (LoRA-family adapters keep their input cast to fp32). With gradient checkpointing each layer keeps only its
  input (p·t·h) and one layer is recomputed in full during backward (**recompute**). **logits and loss**:
  12·t·V (fp32 logits, the log-softmax kept for backward, and the two fp32 gradients of the loss's backward).
  The total is the sum, except that the recomputed layer and the logits are not alive at once: the larger counts.
  A UNet's activations are traced on meta over one whole forward (b latents of (resolution/8)², 77 text tokens).

Not counted: the CUDA context (~0.5-1 GB), allocator fragmentation and caching, temporary buffers (a
dequantized 4-bit weight, attention workspaces, NCCL buckets, ZeRO prefetch), the data loader, and the
rounding of every allocation to the allocator's block size. Add 10-20 % headroom on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import ConfigError, UnsupportedError
from peftlab.estimate_model import PRECISIONS

QUANTIZATIONS = ("none", "nf4", "nf4-double", "int8")
NF4_BLOCK, DOUBLE_QUANT_BLOCK = 64, 256
ADAPTER_BYTES = 4  # adapters train in fp32 (peftlab.inject.adapter_parameters_dtype)
COMPONENTS = ("base_weights", "gathered_weights", "adapter_weights", "gradients", "optimizer_states",
              "activations", "recompute", "logits_and_loss")
LABELS = {"base_weights": "base weights", "gathered_weights": "gathered block (ZeRO-3/FSDP)",
          "adapter_weights": "adapter weights (fp32)", "gradients": "gradients (fp32)",
          "optimizer_states": "AdamW states (fp32 exp_avg, exp_avg_sq)", "activations": "activations",
          "recompute": "recomputed layer (checkpointing)", "logits_and_loss": "logits and loss"}
TRANSIENT = ("recompute", "logits_and_loss")  # alive at different times: the total counts the larger


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for one training step of an adapter, component by component (see the module docstring)."""

    base_weights: int
    gathered_weights: int
    adapter_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    recompute: int
    logits_and_loss: int
    base_parameters: int
    trainable_parameters: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The estimated peak per device, without what is not counted: the sum of the components, except that
        the recomputed layer and the logits are never alive together (with checkpointing, the loss's backward
        ends before the last layer is recomputed), so only the larger of the two counts."""
        persistent = sum(getattr(self, name) for name in COMPONENTS if name not in TRANSIENT)
        return persistent + max(self.recompute, self.logits_and_loss)

    def to_dict(self) -> dict[str, Any]:
        """Every component in bytes, the total, the parameter counts and the settings (JSON-ready)."""
        return {**dataclasses.asdict(self), "total": self.total}

    def table(self) -> str:
        """A plain-text table: one line per non-zero component in GiB and its share of the total."""
        s = self.settings
        share = 100 * self.trainable_parameters / max(self.base_parameters, 1)
        lines = [f"{s['model']}: {s['method']} r={s['r']} on {s['targets']}",
                 f"  {self.trainable_parameters:,} trainable / {self.base_parameters:,} base parameters "
                 f"({share:.3f} %); {s['workload']}, base {s['base']}, "
                 f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {s['sharding']}",
                 f"  {'component':<42}{'GiB':>10}{'share':>8}"]
        for name in COMPONENTS:
            value = getattr(self, name)
            if value:
                lines.append(f"  {LABELS[name]:<42}{value / 2**30:>10.3f}{100 * value / self.total:>7.1f}%")
        overlap = " (recomputed layer and logits: the larger)" if self.recompute else ""
        lines.append(f"  {'total per device':<42}{self.total / 2**30:>10.3f}{overlap}")
        return "\n".join(lines)


def quantized_bytes(numel: int, d_out: int, quantization: str) -> float:
    """Bytes bitsandbytes stores for one ``Linear`` weight of ``numel`` values and ``d_out`` rows.

    nf4: numel/2 + 4·⌈numel/64⌉; nf4-double: numel/2 + ⌈numel/64⌉ + 4·⌈numel/(64·256)⌉; int8: numel + 4·d_out."""
    if quantization == "int8":
        return numel + 4 * d_out
    blocks = math.ceil(numel / NF4_BLOCK)
    if quantization == "nf4":
        return numel / 2 + 4 * blocks
    return numel / 2 + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK)


def _check(precision: str, quantization: str, zero_stage: int, num_devices: int, batch_size: int,
           seq_len: int) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization!r} is not one of {list(QUANTIZATIONS)}")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3; got {zero_stage!r}")
    for name, value in (("num_devices", num_devices), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")


def estimate_memory(
    model: str | Path,
    method: str = "hra",
    r: int = 8,
    target_modules: list[str] | str | None = None,
    batch_size: int = 4,
    seq_len: int = 512,
    resolution: int | None = None,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
    quantization: str = "none",
    zero_stage: int = 0,
    fsdp: bool = False,
    num_devices: int = 1,
    adapter_args: dict[str, Any] | None = None,
) -> MemoryEstimate:
    """Estimate the memory per device of training ``method`` on ``model`` (a folder with ``config.json`` or
    ``unet/config.json``, a ``.json`` file, or a Hub id with a network); see the module docstring for the
    formulas. ``seq_len`` is tokens per example for a language model; ``resolution`` (pixels, default the
    UNet's ``sample_size``·8) for a UNet. ``fsdp`` (full shard) is counted as ZeRO-3. ``target_modules`` as in
    ``peftlab train``: a list, comma-separated names (``"q_proj,v_proj"``), a regex or ``"all-linear"``."""
    from peftlab import estimate_model as em
    from peftlab.model import get_adapter_model

    _check(precision, quantization, zero_stage, num_devices, batch_size, seq_len)
    if isinstance(target_modules, str) and re.fullmatch(r"[\w.-]+(\s*,\s*[\w.-]+)*", target_modules):
        if target_modules != "all-linear":  # plain names are suffixes ("q_proj,v_proj"), as in peftlab train
            target_modules = [t.strip() for t in target_modules.split(",")]
    dtype = PRECISIONS[precision]
    raw = em.read_model_config(model)
    unet = em.is_unet(raw)
    if unet and gradient_checkpointing:
        raise UnsupportedError("gradient checkpointing of a UNet is not modelled; estimate without it")
    base, hf_config = em.build_meta_model(raw, dtype)
    config = em.adapter_config(method, base, r, target_modules, adapter_args, unet)
    wrapped = get_adapter_model(base, config, low_cpu_mem_usage=not unet)  # a UNet's adapters run in the trace
    params = list(wrapped.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    p_bytes = dtype.itemsize
    stage = 3 if fsdp else zero_stage
    base_bytes = _base_bytes(wrapped, p_bytes, quantization)
    values: dict[str, float] = {
        "base_weights": base_bytes / (num_devices if stage == 3 else 1),
        "gathered_weights": _largest_block(wrapped) * p_bytes if stage == 3 and num_devices > 1 else 0,
        "adapter_weights": ADAPTER_BYTES * trainable / (num_devices if stage == 3 else 1),
        "gradients": ADAPTER_BYTES * trainable / (num_devices if stage >= 2 else 1),
        "optimizer_states": 2 * ADAPTER_BYTES * trainable / (num_devices if stage >= 1 else 1),
    }
    if unet:
        latent = (resolution or hf_config.sample_size * 8) // 8
        values["activations"] = em.trace_unet(wrapped, batch_size, latent, dtype)
        workload = f"batch {batch_size} × {latent * 8}² px ({latent}² latents)"
    else:
        values.update(_decoder_activations(wrapped, hf_config, config, batch_size * seq_len, dtype,
                                           gradient_checkpointing))
        workload = f"batch {batch_size} × {seq_len} tokens"
    sharding = "one device" if num_devices == 1 and stage == 0 else (
        f"{'FSDP full shard' if fsdp else f'ZeRO-{stage}'} over {num_devices} devices")
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    settings = {"model": str(model), "method": method, "r": r, "targets": targets, "workload": workload,
                "precision": precision, "quantization": quantization,
                "base": precision if quantization == "none" else f"{quantization} ({precision} compute)",
                "gradient_checkpointing": gradient_checkpointing,
                "sharding": sharding, "num_devices": num_devices, "zero_stage": stage}
    rounded = {k: int(round(values.get(k, 0))) for k in COMPONENTS}
    return MemoryEstimate(**rounded, base_parameters=frozen, trainable_parameters=trainable, settings=settings)


def _base_bytes(model: nn.Module, p_bytes: int, quantization: str) -> float:
    """Bytes of the frozen weights: ``p_bytes`` each, quantized Linear weights as :func:`quantized_bytes`."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    quantized: dict[int, float] = {}
    if quantization != "none":
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and module is not head and not weight.requires_grad:
                quantized[id(weight)] = quantized_bytes(weight.numel(), weight.shape[0], quantization)
    return sum(quantized.get(id(p), p.numel() * p_bytes) for p in model.parameters() if not p.requires_grad)


def _largest_block(model: nn.Module) -> int:
    """Parameters of the largest element of any ``nn.ModuleList`` (a decoder layer, a UNet block)."""
    sizes = [sum(p.numel() for p in block.parameters())
             for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    return max(sizes, default=0)


def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise UnsupportedError(f"found no list of {num_layers} layers in {type(model).__name__}; only decoder "
                           "language models and diffusers UNets are estimated")


def _decoder_activations(model: nn.Module, hf: Any, config: Any, tokens: int, dtype: torch.dtype,
                         checkpointing: bool) -> dict[str, float]:
    """activations, recompute and logits_and_loss of a decoder LM (formulas in the module docstring)."""
    from peftlab import estimate_model as em
    from peftlab.inject import AdapterLayer
    from peftlab.layers import LayerView

    hf = getattr(hf, "text_config", None) or hf
    h, num_layers, vocab = hf.hidden_size, hf.num_hidden_layers, hf.vocab_size
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or h // heads
    inner = getattr(hf, "intermediate_size", None) or 4 * h
    p = dtype.itemsize
    prefix, layers = _decoder_layers(model, num_layers)
    gated = any(name.endswith("gate_proj") or name.endswith("w3") for name, _ in layers[0].named_modules())
    base = tokens * (8 * h + p * (2 * heads * head_dim + 2 * kv_heads * head_dim) + (3 if gated else 2) * p * inner)
    adapters = [0.0] * num_layers
    traces: dict[tuple[int, int, int], em.LayerTrace] = {}
    counted: set[tuple[str, frozenset[str]]] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer) or not name.startswith(prefix + "."):
            continue
        index = int(name[len(prefix) + 1:].split(".", 1)[0])
        view = LayerView(layer.base_layer, name)
        r = config.rank_for(layer.layer_name)
        key = (view.d_in, view.d_out, r)
        if key not in traces:
            traces[key] = em.trace_adapted_linear(config, view.d_in, view.d_out, r, tokens, dtype)
        trace = traces[key]
        group = em.shared_group(name)
        parent = name.rsplit(".", 1)[0]
        if group is not None and (parent, group) in counted:
            adapters[index] += trace.other_bytes  # the group's input is saved once
            continue
        if group is not None:
            counted.add((parent, group))
        adapters[index] += trace.input_bytes + trace.other_bytes
    per_layer = [base + a for a in adapters]
    final_norm = 4 * tokens * h
    if checkpointing:
        return {"activations": num_layers * p * tokens * h + final_norm, "recompute": max(per_layer),
                "logits_and_loss": 12 * tokens * vocab}
    return {"activations": sum(per_layer) + final_norm, "logits_and_loss": 12 * tokens * vocab}
