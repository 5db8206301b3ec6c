"""peftlab.Trainer: extra losses, adapter checkpoints, resume, and a 2-process DDP run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_process_group, tiny_bert
from safetensors.torch import load_file
from transformers import TrainingArguments
from workers.ddp_hra import Data

from peftlab import AdapterModel, HRAConfig, Trainer, get_adapter_model
from peftlab.files import CONFIG_NAME, WEIGHTS_NAME


def _args(tmp_path: Path, **kw) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **kw})


def test_trains_only_the_adapter_and_checkpoints_adapter_folders(tmp_path):
    bert = tiny_bert()
    frozen = {n: p.detach().clone() for n, p in bert.named_parameters()}
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    u0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=Data(),
        eval_dataset=Data(16),
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert all(not torch.equal(p, u0[n]) for n, p in model.named_parameters() if n in u0)
    for name, param in model.base_model.named_parameters():
        key = name.replace(".base_layer", "").replace(".original", "")
        if key in frozen:
            assert torch.equal(param, frozen[key]), name
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / CONFIG_NAME).is_file() and (checkpoint / WEIGHTS_NAME).is_file()
    assert not (checkpoint / "model.safetensors").exists()  # adapters only, not the whole model
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics  # labels were found although AdapterModel.forward takes **kwargs
    reloaded = AdapterModel.from_pretrained(tiny_bert(), checkpoint)
    batch = {"input_ids": Data(4).ids, "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    model.eval()
    assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-6)


def test_extra_loss_is_added_during_training(tmp_path):
    model = get_adapter_model(
        tiny_bert(), HRAConfig(r=4, target_modules=["query"], init_weights=False, orthogonality_weight=10.0)
    )
    for module in model.modules():  # train mode without dropout, so that only the extra loss differs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=Data())
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with_extra = trainer.compute_loss(model, batch)
    model.eval()
    plain = trainer.compute_loss(model, batch)
    assert torch.allclose(with_extra - plain, model.extra_loss(), rtol=1e-4)
    assert model.extra_loss() > 0.1


def test_resume_continues_from_the_adapter_checkpoint(tmp_path):
    def run(max_steps: int, resume: bool):
        model = get_adapter_model(tiny_bert(), HRAConfig(r=4, target_modules=["query", "value"]))
        trainer = Trainer(model=model, args=_args(tmp_path, max_steps=max_steps, save_steps=2), train_dataset=Data())
        trainer.train(resume_from_checkpoint=resume or None)
        return model, trainer

    full, _ = run(4, False)
    full_state = {k: v.clone() for k, v in full.adapter_state_dict().items()}
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")  # as if interrupted after step 2
    resumed, trainer = run(4, True)
    assert trainer.state.global_step == 4
    for key, value in resumed.adapter_state_dict().items():
        assert torch.allclose(value, full_state[key], atol=1e-6), key


@pytest.mark.multiprocess
def test_two_process_ddp_ends_with_identical_adapters(tmp_path):
    worker = Path(__file__).parent / "workers" / "ddp_hra.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", free_port(), str(worker)]
    proc = run_process_group([*cmd, str(tmp_path)], env, timeout=300)
    stderr = proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{k}.safetensors") for k in (0, 1))
    assert rank0.keys() == rank1.keys() and any("hra_u" in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    initial = get_adapter_model(tiny_bert(), HRAConfig(r=4, target_modules=["query", "value"])).adapter_state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in initial)  # it trained


def test_label_smoothing_shifts_labels_for_a_wrapped_causal_lm_and_only_in_training(tmp_path):
    from conftest import tiny_gpt2

    model = get_adapter_model(tiny_gpt2(), HRAConfig(r=4, target_modules=["c_attn"], init_weights=False))
    for module in model.modules():  # deterministic train-mode forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1, label_smoothing_factor=0.1))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    model.eval()
    plain = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(trainer.compute_loss(model, {"input_ids": ids, "labels": labels}), plain.loss)
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    vocab = plain.logits.shape[-1]  # position i predicts token i + 1: the dense definition, smoothed
    expected = torch.nn.functional.cross_entropy(plain.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                                 label_smoothing=0.1)
    unshifted = torch.nn.functional.cross_entropy(plain.logits.reshape(-1, vocab), labels.reshape(-1),
                                                  label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, unshifted)
