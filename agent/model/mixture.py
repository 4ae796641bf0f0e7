"""Robust single-instance UnMix-TNS for every adapted layer at once, in numpy (the folded layout).

The same arithmetic as exporters/unmix.py RobustUnMixTNS2d, with all layers' channels
concatenated: per-layer sums (cosine similarities, shift scores) are np.add.reduceat over
channel segments, so one frame is a dozen array operations whatever the number of layers.
"""
from __future__ import annotations

import numpy as np

from ..contract import AdaptationSpec


class LayerStatistics:
    """Every adapted layer's channels side by side, with the source statistics and the divergence
    the folded session decides its rebuilds by: what the learners (RobustMixture, CameraAnchor) share."""

    def __init__(self, spec: AdaptationSpec, source_stats: dict):
        self.names = [layer.name for layer in spec.layers]
        self.sizes = np.array([layer.channels for layer in spec.layers])
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.eps = np.repeat([layer.eps for layer in spec.layers], self.sizes).astype(np.float32)
        self.source_mean = np.concatenate([source_stats[n][0] for n in self.names]).astype(np.float32)
        self.source_var = np.concatenate([source_stats[n][1] for n in self.names]).astype(np.float32)
        self.k = spec.components

    def _per_layer_sum(self, values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values, self.starts, axis=-1)

    def divergence(self, mu: np.ndarray, var_x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        """Per layer, KL(N(mu, var_x) || N(mean, var)) averaged over channels."""
        vs = var + self.eps
        ratio = (var_x + self.eps) / vs
        terms = (mu - mean) ** 2 / vs + ratio - np.log(ratio) - 1
        return (0.5 * self._per_layer_sum(terms) / self.sizes).astype(np.float32)

    def shift(self, mu: np.ndarray, var_x: np.ndarray) -> np.ndarray:
        """A frame's divergence from the source statistics, as the graph layout's `shift`."""
        return self.divergence(mu, var_x, self.source_mean, self.source_var)


class RobustMixture(LayerStatistics):
    """Components of every layer; `update` moves them with one frame's statistics, `statistics`
    gives what to normalise the next frame with."""

    def __init__(self, spec: AdaptationSpec, source_stats: dict):
        super().__init__(spec, source_stats)
        o = spec.options
        self.temperature = spec.temperature
        self.decay, self.support, self.prior, self.instance = o["decay"], o["support"], o["prior"], o["instance"]
        self.seeds = (o["seed_similarity"] - 1e-3 * np.arange(self.k, dtype=np.float32))[:, None]

    def set_state(self, state: dict) -> None:
        self.means = np.concatenate([state[n]["means"] for n in self.names], axis=1).astype(np.float32)
        self.vars = np.concatenate([state[n]["vars"] for n in self.names], axis=1).astype(np.float32)
        self.counts = np.concatenate([state[n]["counts"] for n in self.names], axis=1).astype(np.float32)  # (K, L)
        self._work, self._work2, self._work3 = (np.empty_like(self.means) for _ in range(3))

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        means, variances = np.split(self.means, self.starts[1:], axis=1), np.split(self.vars, self.starts[1:], axis=1)
        return {n: {"means": m.copy(), "vars": v.copy(), "counts": self.counts[:, [i]].copy()}
                for i, (n, m, v) in enumerate(zip(self.names, means, variances))}

    def update(self, mu: np.ndarray, var_x: np.ndarray, strength: float = 1.0, frames: int = 1) -> None:
        """One measured frame standing for `frames` frames: the components forget for all of them."""
        # in place on (K, C) scratch arrays: a frame is a few dozen passes over K x C floats
        u = mu - self.source_mean
        work = np.subtract(self.means, self.source_mean, out=self._work)
        np.multiply(work, work, out=self._work2)
        norms = np.sqrt(self._per_layer_sum(self._work2)) * np.sqrt(self._per_layer_sum(u * u))
        np.multiply(work, u, out=self._work2)
        cos = self._per_layer_sum(self._work2) / np.maximum(norms, 1e-12)  # (K, L)
        logits = np.where(self.counts < 1e-3, self.seeds, cos) / self.temperature
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        self.counts += strength * (p - self.counts * (1 - (1 - self.decay) ** frames))
        rate = np.repeat(strength * p / np.maximum(self.counts, 1e-12), self.sizes, axis=1)  # (K, C)
        d_mean = np.subtract(mu, self.means, out=self._work)
        # vars += rate (var_x - vars + (1 - rate) d^2): the weighted mixture of component and frame
        spread = np.multiply(d_mean, d_mean, out=self._work2)
        spread -= np.multiply(rate, spread, out=self._work3)
        spread += var_x
        spread -= self.vars
        spread *= rate
        self.vars += spread
        d_mean *= rate
        self.means += d_mean

    def statistics(self, mu: np.ndarray | None = None, var_x: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The source prior mixed with every component by its support, and the given frame's own
        statistics with weight `instance` (none after a reset or a restore)."""
        weight = np.repeat(self.counts / (self.counts + self.support), self.sizes, axis=1)
        total = weight.sum(0) + self.prior
        mean = (self.source_mean * self.prior + np.einsum("kc,kc->c", weight, self.means)) / total
        second_k = np.multiply(self.means, self.means, out=self._work)
        second_k += self.vars
        second = ((self.source_var + self.source_mean ** 2) * self.prior
                  + np.einsum("kc,kc->c", weight, second_k)) / total
        if mu is not None:
            mean = mean + self.instance * (mu - mean)
            second = second + self.instance * (var_x + mu * mu - second)
        return mean.astype(np.float32), np.maximum(second - mean * mean, 0.0).astype(np.float32)
