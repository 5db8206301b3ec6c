"""Shared fixtures: small randomly initialised models that build in milliseconds."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*PEFT.*")


def tiny_bert(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 100, (3, 11), generator=g),
        "attention_mask": torch.ones(3, 11, dtype=torch.long),
    }


KEYWORD_WORDS = "the a movie film plot actor story scene music long short slow fast old new".split()


def write_keyword_csv(path, rows: int, seed: int = 0, labels: dict[int, str] | None = None):
    """Six random words per row; label 1 rows also contain 'excellent'; ``labels`` replaces the label of some rows."""
    import random

    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        words = [rng.choice(KEYWORD_WORDS) for _ in range(6)]
        if i % 2:
            words.insert(rng.randrange(6), "excellent")
        lines.append(f"{' '.join(words)},{(labels or {}).get(i, i % 2)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_classifier(folder) -> None:
    """A 2-layer, hidden-32 BERT classifier with the MiniLM tokenizer, saved like a hub checkpoint
    (``initializer_range=0.1``: with the default 0.02 the attention passes almost no signal in a few steps)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftlab.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_lm(folder, texts: list[str], vocab_size: int) -> None:
    """A 2-layer GPT-2 (hidden 32) and a byte-level BPE tokenizer trained on ``texts``, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
