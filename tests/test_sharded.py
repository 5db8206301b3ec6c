"""Adapters of sharded models: FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3, 2 CPU processes each (gloo).

The multi-process tests (marker ``multiprocess``; select them with ``-m multiprocess``) train with the same data and
seed as a one-process run without sharding and compare the saved adapters with it (max abs difference 1e-5);
every saved tensor must have its full shape. The shape guard itself is tested in one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_process_group, tiny_bert
from safetensors.torch import load_file

from peftlab import AdapterError, AdapterModel, HRAConfig, get_adapter_model
from peftlab.files import WEIGHTS_NAME

WORKERS = Path(__file__).parent / "workers"


def torchrun(worker: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 300) -> None:
    """Run ``worker`` on 2 processes with ``torch.distributed.run``; fail with the end of its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), str(worker), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
           os.environ.get("PYTHONPATH", "")]), **(env or {})}
    proc = run_process_group(cmd, env, timeout)  # a deadlocked rank: the launcher and both workers are killed
    stderr = proc.stderr
    assert proc.returncode == 0, stderr[-4000:]


def assert_close(saved: Path, reference: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    tensors = load_file(saved / WEIGHTS_NAME)
    assert tensors.keys() == reference.keys()
    for key, value in reference.items():
        assert tensors[key].shape == value.shape, key  # never a partition or a shard
        assert torch.allclose(tensors[key], value, atol=atol, rtol=0), (key, (tensors[key] - value).abs().max())


# -- the guard, in one process -----------------------------------------------------------------------------------
def test_a_partitioned_tensor_is_never_written(tmp_path):
    """A tensor of shape (0,) (what a ZeRO-3 partition looks like) or of another shape than the adapter's is an
    error that says how to save, and nothing is written."""
    model = get_adapter_model(tiny_bert(), HRAConfig(r=4, target_modules=["query"]))
    full = model.state_dict()
    key = next(k for k in full if k.endswith("hra_u"))
    for bad in (torch.empty(0), torch.zeros(3, 4)):
        with pytest.raises(AdapterError, match=r"refusing to save adapter 'default'.*declared shape.*every process"):
            model.save_pretrained(tmp_path / "out", state_dict={**full, key: bad})
        assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


def test_the_given_state_dict_is_saved_and_a_missing_key_is_a_clear_error(tmp_path):
    """``state_dict=`` (the model's full state dict, as HF Trainer passes it) is what gets saved, not the parameters;
    one without the adapter's tensors is an error naming the missing key."""
    model = get_adapter_model(tiny_bert(), HRAConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    given = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=given)
    expected = {k: v + 1.0 for k, v in model.adapter_state_dict().items()}
    assert_close(tmp_path / "given", expected, atol=0)
    model.save_pretrained(tmp_path / "base", state_dict={k.removeprefix("base_model."): v for k, v in given.items()})
    assert_close(tmp_path / "base", expected, atol=0)
    with pytest.raises(AdapterError, match=r"has no tensor 'base_model\..*query.*hra_u' of adapter 'default'"):
        model.save_pretrained(tmp_path / "none", state_dict={"other.weight": torch.zeros(1)})
    model.save_pretrained(tmp_path / "skipped", state_dict={}, is_main_process=False)
    assert not (tmp_path / "skipped").exists()


# -- FSDP2 -------------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_fsdp2_adapters_of_every_method_save_as_one_process_trains_them(tmp_path):
    from workers.fsdp2_adapters import CONFIGS, tiny_llama, train

    torchrun(WORKERS / "fsdp2_adapters.py", str(tmp_path))
    for method in CONFIGS:
        reference = train(method).adapter_state_dict()  # one process, the whole batch, no sharding
        initial = get_adapter_model(tiny_llama(), CONFIGS[method]()).adapter_state_dict()
        assert max((reference[k] - initial[k]).abs().max() for k in initial) > 1e-3  # it trained
        for kind in ("gathered", "state_dict"):
            assert_close(tmp_path / method / kind, reference)
        reloaded = AdapterModel.from_pretrained(tiny_llama(), tmp_path / method / "gathered")
        for key, value in reloaded.adapter_state_dict().items():
            assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key


# -- DeepSpeed ZeRO-3 --------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_zero3_partitioned_adapters_save_as_one_process_trains_them_and_load_back(tmp_path):
    """ZeRO-3 with the adapters partitioned: each way of saving gathers them (it used to write (0,)-shaped tensors),
    and an adapter loaded into the partitioned model lands in its partitions."""
    pytest.importorskip("deepspeed")
    from workers.zero3_hra import adapter_model, train

    initial = adapter_model()
    initial.save_pretrained(tmp_path / "initial")
    reference = train(str(tmp_path / "one")).model.adapter_state_dict()  # one process, the whole batch
    assert max((reference[k] - v).abs().max() for k, v in initial.adapter_state_dict().items()) > 1e-3
    torchrun(WORKERS / "zero3_hra.py", str(tmp_path / "out"), str(tmp_path / "initial"),
             env={"DS_ACCELERATOR": "cpu"})
    for kind in ("trainer", "no16bit", "direct", "set"):
        assert_close(tmp_path / "out" / kind, reference)
    assert_close(tmp_path / "out" / "reloaded", initial.adapter_state_dict(), atol=0)
    reloaded = AdapterModel.from_pretrained(adapter_model().base_model, tmp_path / "out" / "trainer")
    for key, value in reloaded.adapter_state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key


# -- the accelerate config files ----------------------------------------------------------------------------------
CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


@pytest.mark.parametrize(("name", "kind", "plugin"), [
    ("ddp", "MULTI_GPU", {}),
    ("fsdp", "FSDP", {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}),
    ("deepspeed_zero2", "DEEPSPEED", {"zero_stage": 2}),
    ("deepspeed_zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
])
def test_accelerate_config_files_parse(name, kind, plugin):
    """Each shipped file loads with accelerate's own config loader (unknown keys would be an error there) and asks for
    what its name says; FSDP saves a full state dict (with a sharded one HF would not save the adapter)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_machines == 1
    found = {**config.fsdp_config, **config.deepspeed_config}
    assert {k: found.get(k) for k in plugin} == plugin


@pytest.mark.multiprocess
def test_accelerate_launch_with_the_zero3_config_trains_and_saves_a_full_adapter(tmp_path):
    """``accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m peftlab.cli train`` on 2 CPU
    processes: the run finishes its 4 steps with the data split between the processes (epoch 1.0: 32 rows, batch 4
    per process), and its adapter has every tensor at full shape and loads back. (DeepSpeed JIT-compiles a
    shared-memory all-reduce kernel on its first CPU run: minutes, once.)"""
    pytest.importorskip("deepspeed")
    import json

    from conftest import save_tiny_classifier, write_keyword_csv
    from transformers import AutoModelForSequenceClassification

    save_tiny_classifier(tmp_path / "model")
    data = write_keyword_csv(tmp_path / "small.csv", 40, seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "deepspeed_zero3.yaml"),
           "--main_process_port", free_port(), "-m", "peftlab.cli", "train", "--model", str(tmp_path / "model"),
           "--data", str(data), "--method", "lora", "--max-steps", "4", "--eval-steps", "2", "--batch-size", "4",
           "--no-initial-eval", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = run_process_group(cmd, env, timeout=900)
    stderr = proc.stderr
    assert proc.returncode == 0, stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 1.0
    reloaded = AdapterModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model"), out)
    saved = load_file(out / WEIGHTS_NAME)
    for key, value in reloaded.adapter_parameters("default").items():
        assert saved[key].shape == value.shape and saved[key].numel() > 0, key
    best = load_file(Path(state["best_model_checkpoint"]) / WEIGHTS_NAME)  # restored at the end, then saved
    assert all(torch.equal(saved[key], best[key]) for key in best)
