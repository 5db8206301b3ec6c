"""Train a tiny random Llama with an adapter of each method under FSDP2 (``fully_shard``) and save it.

Run under torchrun (2 CPU processes, gloo): ``fsdp2_adapters.py OUT``. For each method it trains
``STEPS`` AdamW steps, each process on its half of the batch, then saves the adapter twice: by
``save_pretrained`` on every process (it gathers the DTensor shards) into ``OUT/<method>/gathered`` and with
the full state dict that ``get_model_state_dict`` gathers (what HF Trainer passes) into ``OUT/<method>/state_dict``.
``train(method, rank=0, world=1)`` is the same run in one process, without sharding: the test's reference.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab import AdapterModel, HRAConfig, HydraLoraConfig, LoraConfig, MTLoraConfig, get_adapter_model

STEPS = 3
BATCH = 8
TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, target_modules=TARGETS, init_weights=False),
    "hra": lambda: HRAConfig(r=4, target_modules=TARGETS, init_weights=False),
    "hydralora": lambda: HydraLoraConfig(r=4, num_heads=2, target_modules=TARGETS, init_weights=False),
    "mtlora": lambda: MTLoraConfig(r=4, target_modules=TARGETS),
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """The full batch of step ``step``: BATCH random sequences of 12 tokens (no padding, so each process's half
    has as many tokens as the other's and the mean of their mean losses is the full batch's mean loss)."""
    return torch.randint(0, 100, (BATCH, 12), generator=torch.Generator().manual_seed(100 + step))


def train(method: str, rank: int = 0, world: int = 1) -> AdapterModel:
    """STEPS steps of AdamW (lr 1e-2) on the adapter; with ``world > 1`` under FSDP2 on this process's rows."""
    model = get_adapter_model(tiny_llama(), CONFIGS[method]())  # same seed on every process: same initial adapter
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(STEPS):
        ids = batch(step)[rank::world]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def main(out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for method in CONFIGS:
        model = train(method, rank, world)
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())  # it really is sharded
        model.save_pretrained(os.path.join(out, method, "gathered"), is_main_process=rank == 0)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.save_pretrained(os.path.join(out, method, "state_dict"), state_dict=full, is_main_process=rank == 0)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
