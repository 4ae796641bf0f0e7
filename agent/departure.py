"""What the model's own layers show of a camera's frames: how far they have moved from the camera's usual.

Compression, pixelation and warping leave a frame's brightness, contrast, sharpness and colour where they
were (agent/imaging.py sees nothing), yet they move the statistics the middle of the network normalises.
The camera anchor keeps those statistics for the camera's usual conditions (its reference); an unadapted
frame that measured its own gives, per layer, the KL divergence from them: its departure. Content moves
the departure too (people walking through a hall move the deep layers), so each layer's departure is
read against its own usual level and spread on this camera, and the score is a high quantile over layers:
a condition moves most layers at once, content a few.
"""
from __future__ import annotations

import numpy as np

QUANTILE = 90  # over layers: the score follows the layers a condition moves most, beyond a few content moves
MIN_SPREAD = 0.3  # log KL: a still camera's tiny spread does not turn every passer-by into a departure
WARMUP = 8  # measurements that learn the usual level before any score
FOLLOW = 1 / 50  # per measurement, once warm: the usual level follows a slowly changing scene
CHANGED_MEASUREMENTS = 2  # measurements in a row above the threshold that open an episode


class DepartureWatch:
    """`measure(departure, learn)` with each measured unadapted frame's per-layer KL from the camera's reference;
    `score` in the layers' own spreads; `changed` once it has passed the threshold on CHANGED_MEASUREMENTS
    measurements in a row."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.mean: np.ndarray | None = None  # (layers,) usual log KL
        self.var: np.ndarray | None = None
        self.count = 0
        self.score = 0.0
        self._above = 0

    @property
    def warm(self) -> bool:
        return self.count >= WARMUP

    @property
    def changed(self) -> bool:
        return self._above >= CHANGED_MEASUREMENTS

    def measure(self, departure: np.ndarray, learn: bool) -> None:
        """One measurement; `learn`: the camera is in its usual conditions, so the level may follow it (only
        while it stays under the threshold: a condition coming on does not teach it)."""
        x = np.log(np.maximum(np.asarray(departure, np.float64), 1e-12))
        if self.mean is None or len(self.mean) != len(x):
            self.mean, self.var, self.count = x.copy(), np.zeros_like(x), 0
        if self.warm:
            spread = np.maximum(np.sqrt(self.var), MIN_SPREAD)
            self.score = float(np.percentile((x - self.mean) / spread, QUANTILE))
            self._above = self._above + 1 if self.score > self.threshold else 0
        if learn and self.score <= self.threshold:
            self.count += 1
            rate = max(FOLLOW, 1 / self.count)
            d = x - self.mean
            self.mean += rate * d
            self.var += rate * ((1 - rate) * d * d - self.var)

    def forget_score(self) -> None:
        """An episode another signal opened: what was measured before it says nothing about its end."""
        self.score, self._above = 0.0, 0

    def state(self) -> dict | None:
        if self.mean is None:
            return None
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def restore(self, state: dict | None) -> None:
        """From `state()`; a state that does not fit raises ValueError and leaves the watch as it was."""
        if state is None:
            self.reset()
            return
        try:
            mean, var = (np.asarray(state[k], np.float64) for k in ("mean", "var"))
            count = int(state["count"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("departure is not a mapping of mean, var and count") from None
        if mean.ndim != 1 or mean.shape != var.shape or not (np.all(np.isfinite(mean)) and np.all(var >= 0)):
            raise ValueError(f"departure mean and var have shapes {mean.shape} and {var.shape}, or bad values")
        self.reset()
        self.mean, self.var, self.count = mean, var, max(count, 0)
