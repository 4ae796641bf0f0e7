"""Stateful torch UnMix-TNS (Tomar et al., ICLR 2024) for one frame at a time.

This is the reference the exported graph is checked against, and the layer the torch
backend runs. It follows the formulas in DESIGN.md line by line, in float64-free plain
torch, with the components as buffers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

K_DEFAULT = 16
TEMPERATURE = 0.07
# The paper's momentum 0.1 is per batch of 64; one frame gets the 64th root of its complement.
MOMENTUM_BATCH1 = 1 - (1 - 0.1) ** (1 / 64)


class UnMixTNS2d(nn.Module):
    def __init__(self, bn: nn.BatchNorm2d, means: np.ndarray, variances: np.ndarray,
                 momentum: float = MOMENTUM_BATCH1, temperature: float = TEMPERATURE):
        super().__init__()
        self.eps = bn.eps
        self.momentum = momentum
        self.temperature = temperature
        self.register_buffer("weight", bn.weight.detach().clone())
        self.register_buffer("bias", bn.bias.detach().clone())
        self.register_buffer("source_mean", bn.running_mean.detach().clone())
        self.register_buffer("source_var", bn.running_var.detach().clone())
        self.register_buffer("means", torch.as_tensor(np.array(means), dtype=torch.float32))
        self.register_buffer("vars", torch.as_tensor(np.array(variances), dtype=torch.float32))
        self.adapt = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"single-instance UnMix-TNS takes one frame, got a batch of {x.shape[0]}")
        if not self.adapt:
            mean, var = self.source_mean, self.source_var
        else:
            mu = x.mean(dim=(2, 3))[0]
            var_x = x.var(dim=(2, 3), unbiased=False)[0]
            sim = torch.cosine_similarity(mu[None, :], self.means, dim=1, eps=1e-12)
            p = torch.softmax(sim / self.temperature, dim=0)[:, None]
            mean_k = (1 - p) * self.means + p * mu
            var_k = (1 - p) * self.vars + p * var_x
            mean = mean_k.mean(0)
            var = var_k.mean(0) + (mean_k ** 2).mean(0) - mean ** 2
            self.means += self.momentum * p * (mu - self.means)
            self.vars += self.momentum * p * (var_x - self.vars)
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]

    def get_state(self) -> dict[str, np.ndarray]:
        return {"means": self.means.numpy().copy(), "vars": self.vars.numpy().copy()}


def batchnorm_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def replace_batchnorm(model: nn.Module, state: dict, **kwargs) -> dict[str, UnMixTNS2d]:
    """Swap every BatchNorm2d in place for a UnMixTNS2d seeded from state[layer]."""
    layers = {}
    for name, bn in batchnorm_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = UnMixTNS2d(bn, state[name]["means"], state[name]["vars"], **kwargs)
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers
