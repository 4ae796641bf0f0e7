"""LAME (Boudiaf et al., CVPR 2022) online: every frame corrected over a window of the last W frames.

Energy, for probabilities p_i and affinity A over the window:
    E(z) = sum_i KL(z_i || p_i) - sum_ij A_ij z_i . z_j
minimised by the concave-convex fixed point z_i = softmax(log p_i + sum_j A_ij z_j),
which never raises E. The newest frame's z is its corrected prediction.
"""
from __future__ import annotations

from collections import deque

import numpy as np

LOG_FLOOR = 1e-10


def affinity(features: np.ndarray, kind: str = "knn", k: int = 3) -> np.ndarray:
    """(N, N) affinity of L2-normalised features: binary kNN (no self-loops) or RBF."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sq = np.sum(x * x, axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    n = len(x)
    if kind == "knn":
        a = np.zeros((n, n), np.float32)
        neighbours = min(k, n - 1)
        if neighbours > 0:
            others = dist.copy()
            np.fill_diagonal(others, np.inf)
            order = np.argsort(others, axis=1)[:, :neighbours]
            np.put_along_axis(a, order, 1.0, axis=1)
        return a
    if kind == "rbf":
        kth = np.sort(dist, axis=1)[:, min(k, n - 1)]
        sigma = float(kth.mean())
        if sigma <= 1e-6:  # one frame, or identical frames: nothing to spread, no NaN
            return np.eye(n, dtype=np.float32)
        return np.exp(-(dist ** 2) / (2 * sigma ** 2)).astype(np.float32)
    raise ValueError(f"affinity must be 'knn' or 'rbf', got {kind!r}")


def energy(z: np.ndarray, probs: np.ndarray, a: np.ndarray) -> float:
    az = a @ z
    return float(np.sum(z * (np.log(np.maximum(z, LOG_FLOOR)) - np.log(np.maximum(probs, LOG_FLOOR)) - az),
                        dtype=np.float64))


def solve(probs: np.ndarray, a: np.ndarray, max_steps: int = 100, tol: float = 1e-8,
          log_p: np.ndarray | None = None) -> np.ndarray:
    """Fixed-point iterations until the energy stops falling, in float32 as the official code runs.

    An iteration is one small matrix product, one exp and three reductions over the (window x classes)
    array: with z = exp(log p + A z' - m) / t (z' the previous iterate, m the row max, t the row
    sum), log z - log p - A z = A z' - A z - (m + log t), so the energy needs no log of z and its
    pairwise term is the product the next iteration uses anyway. Sums are plain numpy reductions,
    not BLAS dot products: on a busy 2-core box OpenBLAS hands those to a second thread and waits."""
    probs = np.asarray(probs, np.float32)
    a = np.asarray(a, np.float32)
    log_p = np.log(np.maximum(probs, LOG_FLOOR)) if log_p is None else log_p
    az = a @ probs
    previous = -float(np.sum(probs * az, dtype=np.float64))
    z = np.empty_like(probs)
    for _ in range(max_steps):
        np.add(log_p, az, out=z)
        top = z.max(axis=1, keepdims=True)
        z -= top
        np.exp(z, out=z)
        total = z.sum(axis=1, keepdims=True)
        z /= total
        az_next = a @ z
        az -= az_next
        current = float(np.sum(z * az, dtype=np.float64) - np.sum(top + np.log(total), dtype=np.float64))
        az = az_next
        if abs(previous - current) <= tol * max(abs(previous), 1e-12):
            break
        previous = current
    return z


class Lame:
    """Keeps the last `window` frames' features and probabilities; update() corrects the newest."""

    def __init__(self, window: int = 16, affinity: str = "knn", k: int = 3, max_steps: int = 100):
        if window < 1:
            raise ValueError("LAME window must be at least 1 frame")
        self.window, self.kind, self.k, self.max_steps = window, affinity, k, max_steps
        self.features: deque[np.ndarray] = deque(maxlen=window)
        self.probs: deque[np.ndarray] = deque(maxlen=window)
        self.log_probs: deque[np.ndarray] = deque(maxlen=window)  # each frame's, taken once

    def update(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, np.float32)
        self.features.append(np.asarray(features, np.float32))
        self.probs.append(probs)
        self.log_probs.append(np.log(np.maximum(probs, LOG_FLOOR)))
        a = affinity(np.stack(self.features), self.kind, self.k)
        return solve(np.stack(self.probs), a, self.max_steps, log_p=np.stack(self.log_probs))[-1]

    def reset(self) -> None:
        self.features.clear()
        self.probs.clear()
        self.log_probs.clear()


class CorrelationMonitor:
    """Is the stream label-correlated in time? LAME helps only when it is.

    Compares how often consecutive frames share a top-1 class with what independent
    draws from the recent class frequencies would give; a ratio well above 1 means runs.
    """

    def __init__(self, classes: int, halflife: float = 200.0, threshold: float = 2.0, warmup: int = 50):
        self.decay = 0.5 ** (1.0 / halflife)
        self.freq = np.full(classes, 1.0 / classes)
        self.agree = 0.0
        self.threshold, self.warmup = threshold, warmup
        self.previous: int | None = None
        self.seen = 0

    def update(self, top1: int) -> None:
        self.freq *= self.decay
        self.freq[top1] += 1 - self.decay
        if self.previous is not None:
            self.agree = self.decay * self.agree + (1 - self.decay) * float(top1 == self.previous)
        self.previous = top1
        self.seen += 1

    @property
    def ratio(self) -> float:
        chance = float(np.sum(self.freq ** 2))
        return self.agree / (1 - self.decay ** max(self.seen - 1, 1)) / max(chance, 1e-6)

    @property
    def correlated(self) -> bool:
        return self.seen >= self.warmup and self.ratio >= self.threshold
