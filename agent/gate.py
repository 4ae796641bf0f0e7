"""How strongly to adapt: only as far as the camera's statistics have left the source's own spread.

At batch size 1, UnMix-TNS components fill with whatever the camera happens to show; on an
unshifted camera that only bends the statistics toward recent content and costs accuracy
(EfficientNet-Lite0 on ordinary photos, Fashion-MNIST on label-correlated streams). The gate
measures each unadapted frame's per-layer shift against the exporter's clean reference
(ModelInfo.shift_reference), smooths the mean standardised shift over frames, and maps it to
a strength in [0, 1] between `low` (no adaptation) and `high` (full).

The shift must come from an unadapted pass: adapted layers make the next layers' inputs look
source-like, so an adapted pass would close the gate it opened. While the strength is 0 the
frame's own pass is unadapted and serves; while it is above 0 a shadow pass every
`shadow_every` frames measures it. Thresholds chosen by bench/quality.py (README).
"""
from __future__ import annotations

import numpy as np

from .contract import ShiftReference


class AdaptationGate:
    def __init__(self, reference: ShiftReference, low: float = 0.5, high: float = 1.5, smoothing: float = 0.05,
                 shadow_every: int = 4):
        if not high > low:
            raise ValueError(f"gate high ({high}) must be above low ({low})")
        self.reference = reference
        self.low, self.high, self.smoothing, self.shadow_every = low, high, smoothing, shadow_every
        self.reset()

    def reset(self) -> None:
        self.level = 0.0  # smoothed mean standardised shift of unadapted passes
        self._last_frame: int | None = None

    @property
    def strength(self) -> float:
        return float(np.clip((self.level - self.low) / (self.high - self.low), 0.0, 1.0))

    def needs_shadow(self, frame: int) -> bool:
        """Whether `frame` needs an unadapted pass to keep the level measured."""
        return self.strength > 0 and frame % self.shadow_every == 0

    def update(self, shift: np.ndarray, frame: int) -> None:
        """`shift` from an unadapted pass of `frame`; sparser observations weigh more, so the level
        forgets at the same rate per frame however often it is measured."""
        gap = 1 if self._last_frame is None else max(1, frame - self._last_frame)
        self._last_frame = frame
        z = float(self.reference.standardise(np.asarray(shift, np.float64)).mean())
        self.level += (1 - (1 - self.smoothing) ** gap) * (z - self.level)
