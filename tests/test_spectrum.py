"""The spectral change of merging: zero for HRA (W·H, H orthogonal), non-zero for an additive ΔW (LoRA)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from peftlab import HRAConfig, LoraConfig, get_adapter_model
from peftlab.spectrum import relative_spectral_change, spectral_changes


def perturbed(config):
    model = get_adapter_model(tiny_bert(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "classifier" not in name:
                p.add_(0.5 * torch.randn_like(p))
    return model


def test_relative_spectral_change_by_definition():
    w = torch.diag(torch.tensor([3.0, 4.0]))  # σ = (4, 3), ‖σ‖ = 5
    assert relative_spectral_change(w, w @ torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.0, abs=1e-12)
    assert relative_spectral_change(w, 2 * w) == pytest.approx(1.0)  # σ doubles: ‖σ‖ / ‖σ‖
    # σ = (3, 0) after, sorted descending: ‖(4, 3) − (3, 0)‖ = √10
    assert relative_spectral_change(w, torch.diag(torch.tensor([3.0, 0.0]))) == pytest.approx(10**0.5 / 5)


def test_hra_keeps_the_spectrum_and_lora_moves_it():
    torch.manual_seed(0)
    hra = perturbed(HRAConfig(r=4, target_modules=["query", "value"], init_weights=False))
    lora = perturbed(LoraConfig(r=4, alpha=8, target_modules=["query", "value"], init_weights=False))
    before = {n: p.detach().clone() for n, p in hra.named_parameters()}
    hra_changes, lora_changes = spectral_changes(hra), spectral_changes(lora)
    assert len(hra_changes) == len(lora_changes) == 4
    assert max(hra_changes.values()) < 1e-6
    assert min(lora_changes.values()) > 1e-3
    assert hra.merged_adapters == [] and all(torch.equal(p, before[n]) for n, p in hra.named_parameters())
