"""Checkpoints of the image training loop through HF ``accelerate``: ``accelerator.save_state`` / ``load_state``
write and read accelerate's optimiser, schedule and RNG states of every process, and the hooks here replace its
model weights by the adapters (a Stable Diffusion UNet alone is 3.4 GB).

A checkpoint folder ``RUN/checkpoint-<step>`` holds

* the adapters as a pipeline adapter folder (``pipeline.json``, ``unet/`` …: ``peftlab generate --adapter
  RUN/checkpoint-<step>`` samples from it) and the trainable tensors by name (``trainable.safetensors``), written by
  the main process;
* ``sampling_generator_<i>.safetensors``: the state of process i's generator of examples and noise;
* accelerate's ``optimizer.bin``, ``scheduler.bin`` and ``random_states_<i>.pkl``, which it reads back with
  ``torch.load(weights_only=True)`` (peftlab registers no custom object: accelerate would unpickle those fully);
* ``trainer_state.json`` (step, losses, number of processes), written last by
  :func:`peftlab.recipes.image.training.save_checkpoint`: a checkpoint without it is incomplete and ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftlab import files
from peftlab.errors import RecipeError
from peftlab.recipes.rundir import TRAINER_STATE

CHECKPOINT_WEIGHTS = "trainable.safetensors"
GENERATOR_FILE = "sampling_generator_{}.safetensors"  # the state of process {}'s sampling generator


def register_checkpoint_hooks(accelerator: Any, pipe: Any, named: dict[str, nn.Parameter],
                              generator: torch.Generator | None) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` keep the adapters, not the models (a Stable Diffusion UNet is
    3.4 GB): the main process writes the pipeline adapter folder and the trainable tensors by name, each process its
    sampling generator's state (all safetensors); on load they are checked and copied back."""
    from accelerate.utils import load as weights_only_load
    from accelerate.utils.constants import RNG_STATE_NAME
    from safetensors.torch import load_file

    from peftlab.diffusion.pipeline import save_pipeline_adapters

    rank = accelerator.process_index

    def save(models: list[nn.Module], weights: list[dict[str, Tensor]], folder: str) -> None:
        weights.clear()  # so accelerate writes no model weights
        if accelerator.is_main_process:
            save_pipeline_adapters(pipe, folder)
            files.save_tensors(Path(folder) / CHECKPOINT_WEIGHTS, dict(named))
        if generator is not None:
            files.save_tensors(Path(folder) / GENERATOR_FILE.format(rank), {"state": generator.get_state()})

    def load(models: list[nn.Module], folder: str) -> None:
        models.clear()  # so accelerate reads no model weights
        tensors = load_file(str(Path(folder) / CHECKPOINT_WEIGHTS))
        if set(tensors) != set(named) or any(tensors[k].shape != p.shape for k, p in named.items() if k in tensors):
            raise RecipeError(f"{folder} holds other trainable parameters than this run has (a different method, r "
                              "or targets); resume it with its own options, or start again with --overwrite")
        with torch.no_grad():
            for key, p in named.items():
                p.copy_(tensors[key])
        if generator is not None:
            generator.set_state(load_file(str(Path(folder) / GENERATOR_FILE.format(rank)))["state"])
        weights_only_load(Path(folder) / f"{RNG_STATE_NAME}_{rank}.pkl")  # accelerate skips an unreadable one

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_checkpoint(checkpoint: str, accelerator: Any) -> dict[str, Any]:
    """Restore a checkpoint of :func:`peftlab.recipes.image.training.save_checkpoint` with
    ``accelerator.load_state`` (its pickles read with ``weights_only=True``; the adapters by
    :func:`register_checkpoint_hooks`); return its ``trainer_state.json``. A checkpoint of other parameters or of
    another number of processes is a RecipeError."""
    folder = Path(checkpoint)
    state = files.read_json(folder / TRAINER_STATE)
    written_by = state.get("num_processes", 1)
    if written_by != accelerator.num_processes:
        raise RecipeError(f"{folder} was written by {written_by} process(es) and this run has "
                          f"{accelerator.num_processes}; resume it with accelerate launch --num_processes {written_by}")
    try:
        accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    except RecipeError:
        raise
    except Exception as err:  # safetensors and torch raise many types for a missing, corrupt or refused file
        raise RecipeError(f"{folder} cannot be read ({type(err).__name__}); delete that folder to resume from the "
                          "start, or start again with --overwrite") from None
    return state


__all__ = ["CHECKPOINT_WEIGHTS", "load_checkpoint", "register_checkpoint_hooks"]
