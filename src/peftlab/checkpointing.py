"""Gradient (activation) checkpointing of an adapted model, for every model kind.

``AdapterModel.gradient_checkpointing_enable(gradient_checkpointing_kwargs)`` turns on the base model's own
checkpointing (transformers: ``activation_checkpointing_enable``; diffusers: ``enable_gradient_checkpointing``),
each checkpointed block run through ``torch.utils.checkpoint.checkpoint(**gradient_checkpointing_kwargs)``
(``use_reentrant`` defaults to ``False``, as in transformers 5 and diffusers).

Reentrant checkpointing (``use_reentrant=True``) runs a block's forward without autograd and reruns it in
backward only if one of the block's *inputs* requires grad. With a frozen base nothing before the first adapter
does, so the adapters inside every block would get no gradient (or backward raises). As HF PEFT and transformers
do, the base's input then gets ``requires_grad``: a forward hook on the input embeddings
(``get_input_embeddings()``, text and vision transformers), or, for a model without them (a diffusers UNet), a
forward pre-hook on the base model that gives its floating-point inputs ``requires_grad`` (on a detached alias:
the caller's tensors are not changed). An adapter whose loss term needs the forward's autograd graph (HydraLoRA's
balance loss) says so through ``Adapter.checkpointing_problem``, and reentrant checkpointing is refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from peftlab.errors import UnsupportedError


def _output_requires_grad(module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


def _inputs_require_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def alias(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point() and not value.requires_grad:
            return value.detach().requires_grad_(True)
        return value

    return tuple(alias(a) for a in args), {k: alias(v) for k, v in kwargs.items()}


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The distinct input-embedding modules of ``model`` and its sub-models (a multimodal model has several)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if getter is None:
            continue
        try:
            embeddings = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embeddings, nn.Module):
            found.setdefault(id(embeddings), embeddings)
    return list(found.values())


class GradientCheckpointing:
    """The checkpointing methods of :class:`peftlab.AdapterModel` (see the module docstring)."""

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Checkpoint the base model's blocks with ``checkpoint(**gradient_checkpointing_kwargs)`` (torch.utils).

        ``use_reentrant`` (default ``False``): with ``True`` the base's input is made to require grad (module
        docstring), and adapters that cannot train that way are refused (:class:`UnsupportedError`).
        ``kwargs`` go to transformers' ``activation_checkpointing_enable`` (e.g. ``every_n_layers``).
        """
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if options["use_reentrant"]:
            self._check_reentrant()
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        elif hasattr(base, "enable_gradient_checkpointing"):  # diffusers: block calls func(module, *args)
            if kwargs.get("every_n_layers", 1) != 1 or kwargs.get("offload", False):
                raise UnsupportedError(f"{type(base).__name__} (diffusers) checkpoints every block on the device; "
                                       f"every_n_layers / offload ({kwargs}) are for transformers models")
            base.enable_gradient_checkpointing(lambda module, *args: checkpoint(module.__call__, *args, **options))
        elif hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)
        else:
            raise UnsupportedError(
                f"{type(base).__name__} has no gradient checkpointing (neither transformers' "
                "activation_checkpointing_enable nor diffusers' enable_gradient_checkpointing); wrap its blocks in "
                "torch.utils.checkpoint.checkpoint yourself"
            )
        if options["use_reentrant"]:
            self.enable_input_require_grads()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn checkpointing off again (and remove the input hooks)."""
        base = self.base_model
        for name in ("activation_checkpointing_disable", "disable_gradient_checkpointing",
                     "gradient_checkpointing_disable"):
            if hasattr(base, name):
                getattr(base, name)()
                break
        self.disable_input_require_grads()

    activation_checkpointing_disable = gradient_checkpointing_disable

    def enable_input_require_grads(self) -> None:
        """Make the base model's input require grad (see the module docstring); idempotent."""
        if self.__dict__.get("_input_grad_hooks"):
            return
        embeddings = input_embeddings(self.base_model)
        hooks = [m.register_forward_hook(_output_requires_grad) for m in embeddings]
        if not hooks:
            hooks = [self.base_model.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)]
        self.__dict__["_input_grad_hooks"] = hooks

    def disable_input_require_grads(self) -> None:
        for hook in self.__dict__.pop("_input_grad_hooks", []):
            hook.remove()

    def _check_reentrant(self) -> None:
        for layer_name, adapter in self._active_adapters():
            problem = adapter.checkpointing_problem(reentrant=True)
            if problem:
                raise UnsupportedError(f"reentrant gradient checkpointing with the adapter on {layer_name}: {problem}")
