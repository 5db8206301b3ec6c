"""Run under torchrun (2 CPU processes, ``DS_ACCELERATOR=cpu``): train a tiny BERT with HRA through peftlab.Trainer
under DeepSpeed ZeRO-3, the adapters partitioned too (``stage3_param_persistence_threshold: 0``).

``zero3_hra.py OUT LOAD``: saves the trained adapter three ways, each of which must gather the partitions:
``OUT/trainer`` (``Trainer.save_model``: HF's gathered 16-bit state dict), ``OUT/no16bit`` (ZeRO-3 without
``stage3_gather_16bit_weights_on_model_save``: HF passes an empty state dict) and ``OUT/direct``
(``save_pretrained`` on every process). Then it loads the adapter in folder LOAD into the partitioned model (as
``load_best_model_at_end`` and resuming do) and saves it again to ``OUT/reloaded``; then ``set_adapter_state_dict``
puts the trained adapter back (``OUT/set``). ``train(...)`` without
DeepSpeed, in one process with the whole batch, is the test's reference run.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import tiny_bert  # noqa: E402
from workers.ddp_hra import Data  # noqa: E402

from peftlab import AdapterModel, HRAConfig, Trainer, get_adapter_model  # noqa: E402
from peftlab.files import load_tensors  # noqa: E402

STEPS = 3
BATCH = 8  # the global batch: one process takes all of it, two processes half each
ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every parameter, the adapters' too
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "zero_allow_untested_optimizer": True,  # HF's torch AdamW: no compiled DeepSpeed optimizer needed
    "gradient_clipping": "auto",  # max_grad_norm, as HF clips without DeepSpeed
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
}


def adapter_model() -> AdapterModel:
    """The same tiny BERT + HRA (random init, seeded) on every process; no dropout, so runs can be compared."""
    bert = tiny_bert()
    for module in bert.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(7)
    return get_adapter_model(bert, HRAConfig(r=4, target_modules=["query", "value"], init_weights=False))


def deepspeed_on_cpu() -> None:
    """Set up accelerate's state for DeepSpeed over gloo: on a machine without GPU, ``TrainingArguments`` alone gives
    DeepSpeed no backend, and each process would train alone on the whole batch."""
    import deepspeed.comm.torch
    from accelerate import PartialState

    deepspeed.comm.torch.build_shm_op = lambda: None  # a CPU all-reduce kernel, JIT-compiled (minutes); gloo does
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def train(out: str, world: int = 1, deepspeed: dict | None = None) -> Trainer:
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        per_device_train_batch_size=BATCH // world,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        average_tokens_across_devices=False,  # else HF doubles a classifier's loss on 2 processes
        report_to=[],
        save_strategy="no",
        use_cpu=deepspeed is None,
        seed=0,
        disable_tqdm=True,
        deepspeed=deepspeed,
        accelerator_config={"use_configured_state": deepspeed is not None},
    )
    trainer = Trainer(model=adapter_model(), args=args, train_dataset=Data())
    trainer.train()
    return trainer


def main(out: str, load: str) -> None:
    deepspeed_on_cpu()
    trainer = train(out, world=int(os.environ["WORLD_SIZE"]), deepspeed=ZERO3)
    model, main_process = trainer.model, trainer.args.should_save
    assert trainer.is_deepspeed_enabled and trainer.accelerator.num_processes == 2
    assert all(p.ds_tensor is not None and p.numel() == 0 for p in model.adapter_parameters("default").values())
    trainer.save_model(os.path.join(out, "trainer"))
    engine = trainer.model_wrapped
    engine.zero_gather_16bit_weights_on_model_save = lambda: False  # as with the option off
    # HF then passes an empty state dict (the adapter is peftlab's to gather) and has DeepSpeed write its own
    # full checkpoint: not what is checked here, and on CPU that save once aborted a rank ("terminate called
    # without an active exception"), so it is skipped
    engine.save_checkpoint = lambda *args, **kwargs: None
    trainer.save_model(os.path.join(out, "no16bit"))
    model.save_pretrained(os.path.join(out, "direct"), is_main_process=main_process)
    trainer._load_from_checkpoint(load)  # what resuming (and load_best_model_at_end) does
    model.save_pretrained(os.path.join(out, "reloaded"), is_main_process=main_process)
    torch.distributed.barrier()  # OUT/trainer is written (by the main process) before every process reads it
    model.set_adapter_state_dict(load_tensors(os.path.join(out, "trainer")))  # back to the trained adapter
    model.save_pretrained(os.path.join(out, "set"), is_main_process=main_process)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Every file is written (the test reads them after). Leave without running C++ static destructors: on CPU,
    # DeepSpeed's / gloo's background threads sometimes abort a rank at interpreter exit ("terminate called without
    # an active exception", exit -6) after all the work is done, which failed 2 of about 8 fresh-clone runs.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
