"""Run under torchrun (2 CPU processes, gloo): train a tiny BERT with HRA through peftlab.Trainer.

Each rank writes its final adapter tensors to OUT/rank<k>.safetensors so the test can compare them.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import tiny_bert  # noqa: E402

from peftlab import HRAConfig, Trainer, get_adapter_model  # noqa: E402


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    base = tiny_bert()
    torch.manual_seed(1234 + rank)  # different adapter inits per rank: DDP must still end with identical weights
    model = get_adapter_model(base, HRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    save_file(
        {k: v.contiguous() for k, v in model.adapter_state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors")
    )


if __name__ == "__main__":
    main(sys.argv[1])
