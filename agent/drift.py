"""Drift alerts from the graph's per-layer shift scores.

Each layer's shift is KL(frame statistics || source statistics). A warm-up learns each
layer's usual level and spread on this camera; the drift score is the mean standardised
shift of the first `score_layers` layers, because low-level changes (fog, night, noise,
blur) show there first while deeper statistics follow scene content, which a camera sees
change all the time. A two-sided Page-Hinkley test on that score (statistics that move
away from the source, or towards it) raises `start`; while drifting, `update` events follow every
`update_every` frames; `end` comes once the smoothed score has stayed back near the
warm-up level for `end_frames` frames (hysteresis, so a flickering score does not flap).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DriftEvent:
    type: str  # "start", "update" or "end"
    episode: str  # one id per drift episode, shared by its start/updates/end
    frame: int
    time: float  # unix seconds
    score: float  # smoothed standardised shift score
    threshold: float
    detector: str
    top_layers: list[dict] = field(default_factory=list)  # [{"layer": name, "z": standardised shift}]


class DriftDetector:
    def __init__(self, layers: list[str], warmup: int = 100, score_layers: int = 2, delta: float = 1.0,
                 threshold: float = 25.0,
                 end_level: float = 1.0, end_frames: int = 30, update_every: int = 100, smoothing: float = 0.1,
                 top_k: int = 3):
        self.layers = layers
        self.score_layers = max(1, min(score_layers, len(layers)))
        self.warmup, self.delta, self.threshold = warmup, delta, threshold
        self.end_level, self.end_frames, self.update_every = end_level, end_frames, update_every
        self.smoothing, self.top_k = smoothing, top_k
        self.detector = f"page-hinkley(delta={delta}, lambda={threshold})"
        self.reset()

    def reset(self) -> None:
        self._warm: list[np.ndarray] = []
        self.mean: np.ndarray | None = None  # per-layer warm-up mean and spread
        self.std: np.ndarray | None = None
        self.episode: str | None = None
        self._up = self._down = 0.0  # Page-Hinkley sums above their running minima, one per direction
        self.level = 0.0  # smoothed standardised score
        self._calm = 0
        self._since_update = 0
        self.last_z = 0.0

    @property
    def active(self) -> bool:
        return self.episode is not None

    def update(self, shift: np.ndarray, frame: int, now: float | None = None) -> DriftEvent | None:
        shift = np.log1p(np.maximum(np.asarray(shift, np.float64), 0.0))  # heavy-tailed KL -> near-normal
        if self.mean is None:
            self._warm.append(shift)
            if len(self._warm) >= self.warmup:
                warm = np.stack(self._warm)
                self.mean = warm.mean(0)
                self.std = np.maximum(warm.std(0), 1e-3 * np.maximum(np.abs(self.mean), 1e-6))
                self._warm = []
            return None
        z_layers = (shift - self.mean) / self.std
        z = float(z_layers[: self.score_layers].mean())
        self.last_z = z
        self.level += self.smoothing * (z - self.level)
        now = time.time() if now is None else now
        if self.episode is None:
            self._up = max(0.0, self._up + z - self.delta)
            self._down = max(0.0, self._down - z - self.delta)
            if max(self._up, self._down) > self.threshold:
                self.episode = uuid.uuid4().hex[:12]
                self._calm = self._since_update = 0
                self.level = z if abs(z) > abs(self.level) else self.level
                return self._event("start", frame, now, z_layers)
            return None
        self._since_update += 1
        self._calm = self._calm + 1 if abs(self.level) < self.end_level else 0
        if self._calm >= self.end_frames:
            event = self._event("end", frame, now, z_layers)
            self.episode = None
            self._up = self._down = 0.0
            return event
        if self._since_update >= self.update_every:
            self._since_update = 0
            return self._event("update", frame, now, z_layers)
        return None

    def _event(self, kind: str, frame: int, now: float, z_layers: np.ndarray) -> DriftEvent:
        order = np.argsort(-np.abs(z_layers))[: self.top_k]
        top = [{"layer": self.layers[i], "z": round(float(z_layers[i]), 2)} for i in order]
        return DriftEvent(kind, self.episode, frame, now, round(float(self.level), 3), self.threshold, self.detector,
                          top)
