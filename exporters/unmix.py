"""Stateful torch UnMix-TNS (Tomar et al., ICLR 2024) for one frame at a time, in two modes.

These are the references the exported graphs are checked against, and the layers a torch
backend runs. `UnMixTNS2d` follows the paper's formulas line by line;
`RobustUnMixTNS2d` is the single-instance variant the benchmark chose (bench/quality.py).
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
        self.strength = 1.0  # the graph's `adapt`: 0 source statistics, components untouched; 1 full
        self.shift = torch.zeros(())  # KL(frame statistics || source), as the graph's `shift` output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"single-instance UnMix-TNS takes one frame, got a batch of {x.shape[0]}")
        mu, var_x = x.mean(dim=(2, 3))[0], x.var(dim=(2, 3), unbiased=False)[0]
        self.shift = self._kl_to_source(mu, var_x)
        if self.strength > 0:
            mean, var = self.mix_and_update(mu, var_x, self.strength)
            mean = self.source_mean + self.strength * (mean - self.source_mean)
            var = self.source_var + self.strength * (var - self.source_var)
        else:
            mean, var = self.source_mean, self.source_var
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]

    def _kl_to_source(self, mu: torch.Tensor, var_x: torch.Tensor) -> torch.Tensor:
        vs = self.source_var + self.eps
        ratio = (var_x + self.eps) / vs
        return 0.5 * ((mu - self.source_mean) ** 2 / vs + ratio - torch.log(ratio) - 1).mean()

    def mix_and_update(self, mu: torch.Tensor, var_x: torch.Tensor, strength: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame's (C,) mean and variance -> the statistics to normalise with; moves the components
        (by `strength` times the full step)."""
        sim = torch.cosine_similarity(mu[None, :], self.means, dim=1, eps=1e-12)
        p = torch.softmax(sim / self.temperature, dim=0)[:, None]
        mean_k = (1 - p) * self.means + p * mu
        var_k = (1 - p) * self.vars + p * var_x
        mean = mean_k.mean(0)
        var = var_k.mean(0) + (mean_k ** 2).mean(0) - mean ** 2
        self.means += strength * self.momentum * p * (mu - self.means)
        self.vars += strength * self.momentum * p * (var_x - self.vars)
        return mean, var

    def get_state(self) -> dict[str, np.ndarray]:
        return {"means": self.means.cpu().numpy().copy(), "vars": self.vars.cpu().numpy().copy()}


# Robust mode defaults, chosen on the Fashion-MNIST-C benchmark (bench/quality.py --sweep; docs/decisions.md).
ROBUST_OPTIONS = {"decay": 1 / 500, "support": 4.0, "prior": 4.0, "seed_similarity": 0.5, "instance": 0.05}


class RobustUnMixTNS2d(UnMixTNS2d):
    """UnMix-TNS for batch 1: the same K components, similarity-weighted mixing and updates, and
    one pass per frame, with what fails at batch 1 fixed.

    - No init noise: every component starts empty (count 0) at the source statistics, so the
      first frames are normalised like the source model. An empty component claims a frame
      that no used one resembles (similarity `seed_similarity`), seeding itself from data.
    - Similarity on means centred on the source mean: raw means share a large common part
      that makes every cosine close to 1.
    - Each component is a forgetting average of the frames it was given: counts n_k decay by
      `decay` per frame and grow by p_k; the update rate p_k / n_k is a cumulative average while
      a component is young and an exponential average (memory ~1/decay frames) once it is not.
    - Normalisation mixes the source statistics (weight `prior`) with every component weighted
      by its support n_k / (n_k + `support`): near 1 for any component with a few frames, so a
      long run of one class fills one component without outweighing the others.
    - The frame's own statistics enter with a fixed weight `instance`, decoupled from K (the
      paper's mixing gives the frame about 1/K).
    """

    def __init__(self, bn: nn.BatchNorm2d, means, variances, counts, temperature: float = TEMPERATURE,
                 decay=ROBUST_OPTIONS["decay"], support=ROBUST_OPTIONS["support"], prior=ROBUST_OPTIONS["prior"],
                 seed_similarity=ROBUST_OPTIONS["seed_similarity"], instance=ROBUST_OPTIONS["instance"]):
        super().__init__(bn, means, variances, temperature=temperature)
        self.register_buffer("counts", torch.as_tensor(np.array(counts), dtype=torch.float32))
        self.decay, self.support, self.prior, self.instance = decay, support, prior, instance
        k = self.means.shape[0]
        self.register_buffer("seeds", (seed_similarity - 1e-3 * torch.arange(k, dtype=torch.float32))[:, None])

    def mix_and_update(self, mu: torch.Tensor, var_x: torch.Tensor, strength: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        centred = self.means - self.source_mean
        u = mu - self.source_mean
        cos = (centred @ u)[:, None] / torch.clamp(centred.norm(dim=1, keepdim=True) * u.norm(), min=1e-12)
        empty = (self.counts < 1e-3).float()
        p = torch.softmax((cos + empty * (self.seeds - cos)) / self.temperature, dim=0)
        self.counts += strength * (p - self.counts * self.decay)
        rate = strength * p / torch.clamp(self.counts, min=1e-12)
        d_mean = mu - self.means
        self.vars += rate * (var_x - self.vars) + rate * (1 - rate) * d_mean ** 2
        self.means += rate * d_mean
        weight = self.counts / (self.counts + self.support)
        total = weight.sum(0) + self.prior
        mean = (self.source_mean * self.prior + (weight * self.means).sum(0)) / total
        second_src = (self.source_var + self.source_mean ** 2) * self.prior
        second = (second_src + (weight * (self.vars + self.means ** 2)).sum(0)) / total
        mean = mean + self.instance * (mu - mean)
        second = second + self.instance * (var_x + mu ** 2 - second)
        return mean, torch.clamp(second - mean ** 2, min=0.0)

    def get_state(self) -> dict[str, np.ndarray]:
        return {**super().get_state(), "counts": self.counts.cpu().numpy().copy()}


def batchnorm_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def replace_batchnorm(model: nn.Module, state: dict, mode: str = "faithful", **kwargs) -> dict[str, UnMixTNS2d]:
    """Swap the BatchNorm2d layers named in `state` for UnMix-TNS layers seeded from it."""
    layers = {}
    for name, bn in batchnorm_layers(model).items():
        if name not in state:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if mode == "robust":
            layer = RobustUnMixTNS2d(bn, state[name]["means"], state[name]["vars"], state[name]["counts"], **kwargs)
        else:
            layer = UnMixTNS2d(bn, state[name]["means"], state[name]["vars"], **kwargs)
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers
