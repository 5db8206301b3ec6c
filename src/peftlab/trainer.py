"""``peftlab.Trainer``: HF ``Trainer`` that knows about adapters.

Plain ``transformers.Trainer`` already trains an :class:`~peftlab.AdapterModel` (its ``forward`` has the
wrapped model's signature, so dataset columns and label names are found). This subclass adds what plain
``Trainer`` cannot know: every active adapter's extra loss term (HRA's orthogonality regulariser,
HydraLoRA's balance loss) is added to the training loss, checkpoints are adapter folders (not the whole
model) from which it resumes and restores the best checkpoint, label smoothing shifts the labels of
a wrapped causal LM and is left out of the evaluation loss, and evaluation keeps the data set's order.
Everything else (DDP, FSDP, DeepSpeed, schedulers, logging) is HF ``Trainer`` unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from peftlab import files, sharded
from peftlab.model import AdapterModel

TRAINING_ARGS_NAME = "training_args.bin"


class Trainer(transformers.Trainer):
    """A drop-in ``transformers.Trainer`` for :class:`~peftlab.AdapterModel` (and plain models)."""

    def _get_eval_sampler(self, eval_dataset) -> torch.utils.data.Sampler | None:
        """Evaluation in the data set's order, also when training groups its batches by length (HF then also
        shuffles the evaluation batches): the recipes sort their evaluation sets by length already, and the
        per-item results of an evaluation (``test_items.jsonl``) must line up with its rows. Several processes:
        ``None``, so accelerate shards the batches in order and gathers them back in order."""
        if eval_dataset is None or not hasattr(eval_dataset, "__len__"):
            return None
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def _adapter_model(self, model: nn.Module | None = None) -> AdapterModel | None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        return unwrapped if isinstance(unwrapped, AdapterModel) else None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's loss plus ``model.extra_loss()`` (only while training).

        With ``label_smoothing_factor`` the training loss is smoothed, with labels shifted for causal LMs (HF
        decides that by the class name of the model it is given, never a causal LM for an ``AdapterModel``),
        and evaluation reports the plain loss: ``eval_loss`` is the NLL, so perplexity means something.
        """
        adapter_model = self._adapter_model(model)
        smoothing = self.label_smoother is not None and self.compute_loss_func is None
        if smoothing and model.training:
            loss, outputs = self._smoothed_loss(model, adapter_model, inputs, num_items_in_batch)
        else:
            smoother, self.label_smoother = self.label_smoother, None if smoothing else self.label_smoother
            try:
                loss, outputs = super().compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            finally:
                self.label_smoother = smoother
        if adapter_model is not None and model.training:
            extra = adapter_model.extra_loss()
            if extra.requires_grad:
                loss = loss + extra.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _smoothed_loss(
        self, model: nn.Module, adapter_model: AdapterModel | None, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        """HF's label-smoothed loss, labels shifted when the (wrapped) model is a causal LM."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        plain = adapter_model.base_model if adapter_model is not None else self.accelerator.unwrap_model(model)
        shift = plain._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        return self.label_smoother(outputs, labels, shift_labels=shift, num_items_in_batch=num_items_in_batch), outputs

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter folder (not the whole model). HF calls this on every process; under FSDP and
        DeepSpeed ZeRO-3 ``state_dict`` is the model's full state dict that HF gathered (on the main process), and
        the adapters are taken from it. ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` gathers
        nothing (HF passes an empty dummy): then every process takes part in gathering the adapters alone."""
        adapter_model = self._adapter_model()
        if adapter_model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self._zero3_without_gathering():
            state_dict = None
        elif not self.args.should_save:
            return None
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        adapter_model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _zero3_without_gathering(self) -> bool:
        """DeepSpeed ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``: HF gathers no state dict."""
        if not self.is_deepspeed_enabled or self.accelerator.deepspeed_config["zero_optimization"]["stage"] != 3:
            return False
        return not self.model_wrapped.zero_gather_16bit_weights_on_model_save()

    def _restore_adapters(self, folder: str) -> None:
        """Copy the adapters saved in ``folder`` into the model (into the full tensors of ZeRO-3 partitioned
        adapters, re-partitioned afterwards: every process must call this)."""
        adapter_model = self._adapter_model()
        for name in adapter_model.peft_config:
            path = Path(folder) if name == "default" else Path(folder) / name
            params = adapter_model.adapter_parameters(name)
            with sharded.gathered(params.values(), modify=True):
                files.check_and_copy(params, files.load_tensors(path), path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self._adapter_model(model) is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore_adapters(resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        if self._adapter_model() is None:
            return super()._load_best_model()
        self._restore_adapters(self.state.best_model_checkpoint)
        return None
