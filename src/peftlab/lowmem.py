"""Low-memory loading: adapters created on the ``meta`` device and materialised from checkpoint tensors.

``AdapterModel.from_pretrained(base, folder, low_cpu_mem_usage=True)`` (and ``load_adapter``) build each
adapter's parameters on the meta device (shapes and dtypes, no storage, no random init) and then *assign*
the checkpoint's tensors to them (``nn.Module.load_state_dict(..., assign=True)``): a tensor read from the
file becomes the parameter, converted only when its dtype or device differs. The ordinary path allocates
and initialises every adapter, then copies the file's tensors into it, so each adapter exists twice while
it loads. (safetensors maps the file copy-on-write, so the assigned parameters are the file's clean pages,
file-backed memory the kernel can drop and read again, until something writes to them, e.g. training.)

``get_adapter_model(model, config, low_cpu_mem_usage=True)`` leaves the new adapter on the meta device
until ``model.set_adapter_state_dict(tensors)`` fills it (as HF PEFT does). Until then the layers holding
it refuse to run it (:func:`refuse_unloaded`, a forward pre-hook installed only on those layers), and
merging or saving it raises :class:`~peftlab.errors.AdapterError`, each with a message that says to load
its weights.

Every tensor of an adapter module (parameters and buffers) is replaced at once, so a module is either all
on meta or all real. A method that derives state from its parameters at init (a cached tensor) recomputes
it in :meth:`peftlab.methods.base.Adapter.materialised`, which every load calls; none of the built-in
methods keeps such state.
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import AdapterError

LOAD_HINT = (
    "load its weights with model.set_adapter_state_dict(tensors, {name!r}), or load a saved adapter with "
    "AdapterModel.from_pretrained(base, folder, low_cpu_mem_usage=True)"
)


def on_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device (has no data yet)."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def unloaded_message(name: str, action: str) -> str:
    """The one-line error for using adapter ``name`` before its weights are loaded."""
    return (
        f"cannot {action} adapter {name!r}: it was created with low_cpu_mem_usage=True and its parameters are "
        f"still on the meta device (no values); {LOAD_HINT.format(name=name)}"
    )


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the meta device (nothing is allocated)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def refuse_unloaded(holder: str, module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a wrapped layer (``holder="adapters"``) or ``modules_to_save`` wrapper
    (``"copies"``) holding an adapter on the meta device: an active one stops the forward with a clear error."""
    if module.disabled:
        return
    held = module._modules[holder]
    for name in module.active:
        if name in held and on_meta(held[name]):
            where = getattr(module, "layer_name", "") or type(module).__name__
            raise AdapterError(unloaded_message(name, f"run {where} with"))


def guard(module: nn.Module, holder: str) -> None:
    """Install :func:`refuse_unloaded` on ``module`` (once)."""
    if not any(_is_guard(h) for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(functools.partial(refuse_unloaded, holder))


def unguard_if_loaded(module: nn.Module, holder: str) -> None:
    """Remove the guard once nothing ``module`` holds is on meta (a forward then costs nothing extra)."""
    if any(on_meta(m) for m in module._modules[holder].values()):
        return
    for key, hook in list(module._forward_pre_hooks.items()):
        if _is_guard(hook):
            del module._forward_pre_hooks[key]


def _is_guard(hook: Any) -> bool:
    return getattr(hook, "func", None) is refuse_unloaded


@torch.no_grad()
def materialise(module: nn.Module, state: dict[str, Tensor], device: torch.device) -> None:
    """Give ``module`` the values in ``state`` (keyed as ``module.state_dict()``; keys and shapes checked
    by the caller).

    A module on the meta device gets ``state``'s tensors assigned (``load_state_dict(assign=True)``),
    moved to ``device`` and the meta tensors' dtypes (a no-op, hence no copy, when they already match); a
    module with real tensors gets the values copied into them, as an ordinary load does.
    """
    current = module.state_dict(keep_vars=True)
    if not on_meta(module):
        for key, tensor in current.items():
            tensor.copy_(state[key].to(device=tensor.device, dtype=tensor.dtype))
        return
    converted = {key: state[key].to(device=device, dtype=tensor.dtype) for key, tensor in current.items()}
    module.load_state_dict(converted, assign=True)
