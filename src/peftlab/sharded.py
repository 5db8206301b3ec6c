"""Adapter tensors of a sharded model: FSDP2 (``DTensor`` parameters) and DeepSpeed ZeRO-3 (partitioned ones).

Under FSDP2 each process holds a slice of every parameter (a ``DTensor``; ``.shape`` is the full shape,
``.full_tensor()`` gathers it). Under ZeRO-3 a partitioned parameter's ``.data`` is an empty tensor of shape
(0,) outside ``deepspeed.zero.GatheredParameters`` (``.ds_shape`` is the full shape). Saving reads the full
tensors, loading writes them; both are collectives, so every process must take part. An adapter tensor whose
shape is not its declared (full) shape is never written (:func:`check_full_shapes`): that is how a ZeRO-3
partition used to leave a file of (0,)-shaped tensors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor

from peftlab.errors import AdapterError

# wrappers that FSDP1, activation checkpointing and torch.compile put into state-dict keys
_WRAPPER_KEYS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def is_partitioned(tensor: Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (gathered or not)."""
    return hasattr(tensor, "ds_id")


def declared_shape(tensor: Tensor) -> tuple[int, ...]:
    """The full shape of ``tensor``: ZeRO-3's ``ds_shape``, a ``DTensor``'s global shape, else its shape."""
    shape = getattr(tensor, "ds_shape", None)
    return tuple(shape if shape is not None else tensor.shape)


@contextlib.contextmanager
def gathered(tensors: Iterable[Tensor], modify: bool = False) -> Iterator[None]:
    """Inside: ZeRO-3 partitioned parameters among ``tensors`` hold their full data (a collective: every process
    must enter). ``modify``: what process 0 writes into them is kept and re-partitioned on exit (every process
    should write the same values); otherwise changes are discarded. Other tensors are left alone."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def full_tensor(tensor: Tensor) -> Tensor:
    """A plain tensor holding all of ``tensor`` (an FSDP2 ``DTensor`` is gathered: a collective). Call inside
    :func:`gathered` for ZeRO-3 parameters; the result is a copy of those, as their data is freed on exit."""
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor.clone() if is_partitioned(tensor) else tensor


def full_tensors(live: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """key → full tensor of every tensor in ``live`` (the parameters themselves, see :func:`full_tensor`)."""
    with gathered(live.values()):
        return {key: full_tensor(value) for key, value in live.items()}


def strip_wrapper_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with FSDP1 / checkpoint / ``torch.compile`` wrapper names removed from its keys."""
    return {_WRAPPER_KEYS.sub(r"\1", key): value for key, value in state_dict.items()}


def pick(state_dict: Mapping[str, Tensor], keys: Mapping[str, str], adapter_name: str) -> dict[str, Tensor]:
    """adapter key → tensor of ``state_dict`` (a model's full state dict) for ``keys`` (adapter key → model key).

    Model keys are those of ``AdapterModel.state_dict()`` (``base_model.<layer>.adapters.<name>.<param>``); a state
    dict of the wrapped model alone (no ``base_model.`` prefix) and wrapper names in keys are accepted too.
    """
    state = strip_wrapper_keys(state_dict)
    picked: dict[str, Tensor] = {}
    for key, model_key in keys.items():
        found = state.get(model_key, state.get(model_key.removeprefix("base_model.")))
        if found is None:
            example = next(iter(state), "nothing")
            raise AdapterError(
                f"the state_dict passed to save_pretrained has no tensor {model_key!r} of adapter {adapter_name!r} "
                f"({len(state)} tensors, e.g. {example!r}); pass the full state dict of the AdapterModel "
                "(model.state_dict() keys), or none to save the model's own parameters"
            )
        picked[key] = found
    return picked


def check_full_shapes(
    tensors: Mapping[str, Tensor], declared: Mapping[str, tuple[int, ...]], adapter_name: str
) -> None:
    """:class:`AdapterError` unless every tensor has its declared (full) shape: a partitioned or sharded tensor
    (shape (0,) under ZeRO-3, a slice under FSDP) must never reach a file."""
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != declared[key]:
            raise AdapterError(
                f"refusing to save adapter {adapter_name!r}: {key} has shape {tuple(tensor.shape)}, its declared shape "
                f"is {declared[key]}; the tensor is still partitioned or sharded (DeepSpeed ZeRO-3 / FSDP): call "
                "save_pretrained on every process (it gathers), or pass the gathered state_dict "
                "(as transformers.Trainer does)"
            )
