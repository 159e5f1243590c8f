"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""
import torch


def perturbed(path: str, seed: int, scale: float = 0.05):
    """The fixture model with every weight moved: a new version whose greedy output differs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
