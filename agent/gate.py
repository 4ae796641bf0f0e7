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

USUAL_MEMORY = 200  # compared frames: the camera's usual answers follow its scene over this many
PSEUDO_COUNT = 0.5  # per class: no class is impossible in the camera's usual answers
MARGIN = 1.386  # nats (log 4): as if the adapted answers had gathered on a quarter of the classes the unadapted give


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
    """Stops adaptation that has gone wrong, without labels. Every `raw_every`-th frame runs the unadapted model
    too (the same frames in the daemon and in replay). On those frames the guard asks which answers fit what
    this camera usually answers (`usual`: its compared frames outside drift episodes, at strength 0), the
    adapted ones or the unadapted ones on the same frames: over the last `window` compared frames, the
    divergence (KL, nats) of each one's top-1 distribution from the usual one. A fixed camera's adapted answers
    legitimately gather on the class its usual conditions show while the unadapted ones scatter under noise or
    fog: they fit better, and nothing happens. Answers piling onto classes the camera does not usually give,
    further from its usual answers than the unadapted model's by more than `margin`, are a collapse: the
    pipeline resets the components and pauses adaptation for `hold` frames. With no usual answers yet, every
    class is as usual as another, and the test is how much more concentrated the adapted answers are."""

    def __init__(self, classes: int, window: int = 50, margin: float = MARGIN, hold: int = 500,
                 memory: int = USUAL_MEMORY):
        self.classes, self.window, self.margin, self.hold = classes, window, margin, hold
        self.decay = 1.0 - 1.0 / memory
        self.fired = 0
        self.usual_answers = np.zeros(classes)  # forgetting counts of the unadapted top-1 in usual conditions
        self.reset()

    def reset(self) -> None:
        """A fresh window (the camera's usual answers are kept: they are not what collapsed)."""
        self._adapted: deque[int] = deque(maxlen=self.window)
        self._raw: deque[int] = deque(maxlen=self.window)

    def usual(self, raw: np.ndarray) -> None:
        """A compared frame in the camera's usual conditions (its answer is the unadapted model's)."""
        self.usual_answers *= self.decay
        self.usual_answers[int(np.argmax(raw))] += 1.0

    def divergence(self) -> tuple[float, float]:
        """(adapted, unadapted): how far each one's answers over the window are from the camera's usual ones."""
        usual = (self.usual_answers + PSEUDO_COUNT) / (self.usual_answers.sum() + PSEUDO_COUNT * self.classes)

        def kl(top1: deque[int]) -> float:
            p = np.bincount(list(top1), minlength=self.classes) / len(top1)
            seen = p > 0
            return float((p[seen] * np.log(p[seen] / usual[seen])).sum())

        return kl(self._adapted), kl(self._raw)

    def update(self, adapted: np.ndarray, raw: np.ndarray) -> bool:
        """One compared adapted frame; True when adaptation must stop (the window then starts afresh)."""
        self._adapted.append(int(np.argmax(adapted)))
        self._raw.append(int(np.argmax(raw)))
        if len(self._adapted) < self.window:
            return False
        adapted_kl, raw_kl = self.divergence()
        collapsed = adapted_kl > raw_kl + self.margin
        if collapsed:
            self.fired += 1
            self.reset()
        return collapsed
