"""How strongly to adapt: only as far as the camera's statistics have left the source's own spread.

At batch size 1, UnMix-TNS components fill with whatever the camera happens to show; on an
unshifted camera that only bends the statistics toward recent content and costs accuracy
(EfficientNet-Lite0 on ordinary photos, Fashion-MNIST on label-correlated streams). The gate
measures each unadapted frame's per-layer shift against the exporter's clean reference
(ModelInfo.shift_reference), smooths the mean standardised shift over frames, and maps it to
a strength in [0, 1] that starts at `low` and is full `high - low` above it. `low` is raised to
`margin` above the highest level the clean calibration stream itself reached (its scores, run
through the same smoothing): what the model's own clean frames do is not a shift, even when a
few of them are unusual (EfficientNet's calibration photos include a binary horse silhouette).

The shift must come from an unadapted pass: adapted layers make the next layers' inputs look
source-like, so an adapted pass would close the gate it opened. While the strength is 0 the
frame's own pass is unadapted and serves; while it is above 0 a shadow pass every
`shadow_every` frames measures it. Thresholds chosen by bench/quality.py (docs/decisions.md).

CollapseGuard is the other safety: it watches what adaptation does to the predictions.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from .contract import ShiftReference


class AdaptationGate:
    def __init__(self, reference: ShiftReference, low: float = 0.5, high: float = 1.5, smoothing: float = 0.05,
                 shadow_every: int = 4, margin: float = 0.5):
        if not high > low:
            raise ValueError(f"gate high ({high}) must be above low ({low})")
        self.reference = reference
        self.smoothing, self.shadow_every = smoothing, shadow_every
        self.low = max(low, self._calibration_peak() + margin)
        self.high = self.low + (high - low)
        self.reset()

    def _calibration_peak(self) -> float:
        level, peak = 0.0, -np.inf
        for score in self.reference.scores:
            level += self.smoothing * (score - level)
            peak = max(peak, level)
        return float(peak)

    def reset(self) -> None:
        self.level = 0.0  # smoothed mean standardised shift of unadapted passes
        self._last_frame: int | None = None

    @property
    def strength(self) -> float:
        return float(np.clip((self.level - self.low) / (self.high - self.low), 0.0, 1.0))

    def needs_shadow(self, frame: int) -> bool:
        """Whether `frame` needs an unadapted pass to keep the level measured (by distance from the
        last measured frame, so a live source's skipped frames do not skip measurements)."""
        return self.strength > 0 and (self._last_frame is None or frame - self._last_frame >= self.shadow_every)

    def update(self, shift: np.ndarray, frame: int) -> None:
        """`shift` from an unadapted pass of `frame`; sparser observations weigh more, so the level
        forgets at the same rate per frame however often it is measured."""
        gap = 1 if self._last_frame is None else max(1, frame - self._last_frame)
        self._last_frame = frame
        z = float(self.reference.standardise(np.asarray(shift, np.float64)).mean())
        self.level += (1 - (1 - self.smoothing) ** gap) * (z - self.level)


class CollapseGuard:
    """Stops adaptation that has gone wrong, without labels: when the adapted model's top-1 over the
    last `window` compared frames (those with an unadapted pass too) spreads over far fewer classes
    than the unadapted model's on the same frames (marginal entropy below `diversity` times), the
    components have collapsed onto a few classes. The pipeline then resets them and pauses
    adaptation for `hold` frames."""

    def __init__(self, classes: int, window: int = 50, diversity: float = 0.5, hold: int = 500):
        self.classes, self.window, self.diversity, self.hold = classes, window, diversity, hold
        self.fired = 0
        self.reset()

    def reset(self) -> None:
        self._adapted: deque[int] = deque(maxlen=self.window)
        self._raw: deque[int] = deque(maxlen=self.window)

    def _entropy(self, top1: deque[int]) -> float:
        p = np.bincount(list(top1), minlength=self.classes) / len(top1)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def update(self, adapted: np.ndarray, raw: np.ndarray) -> bool:
        """One compared frame; True when adaptation must stop (the guard then starts afresh)."""
        self._adapted.append(int(np.argmax(adapted)))
        self._raw.append(int(np.argmax(raw)))
        if len(self._adapted) < self.window:
            return False
        collapsed = self._entropy(self._adapted) < self.diversity * self._entropy(self._raw)
        if collapsed:
            self.fired += 1
            self.reset()
        return collapsed
