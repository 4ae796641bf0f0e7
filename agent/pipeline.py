"""One camera's per-frame work: preprocess -> adaptive model -> LAME -> drift, as a small stateful object.

The loops (replay, daemon) feed frames to `process` and hand the results to their sinks
(progress bar, report, MQTT); nothing here knows where frames come from or go.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .drift import DriftDetector, DriftEvent
from .lame import CorrelationMonitor, Lame
from .preprocess import FrameError, Preprocessor
from .runtime import AdaptiveSession
from .sources import Frame

log = logging.getLogger(__name__)
ADAPTATION_MODES = ("on", "frozen", "off")
LAME_MODES = ("auto", "on", "off")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


@dataclass
class FrameResult:
    frame: int
    captured: float  # unix seconds the frame was read
    latency_ms: float  # preprocess + model + LAME + drift
    probs: np.ndarray  # the agent's answer: adapted, LAME-corrected when LAME is applied
    adapted: np.ndarray  # UnMix-TNS output before LAME
    raw: np.ndarray | None  # the unadapted model (source statistics), on shadow frames
    corrected: np.ndarray | None  # LAME over the window (None when LAME is off)
    lame_applied: bool  # whether probs is the LAME output (auto: only on label-correlated streams)
    shift: float  # mean per-layer shift score
    drift: DriftEvent | None = None


@dataclass
class PipelineCounters:
    processed: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> frames

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class CameraPipeline:
    def __init__(self, session: AdaptiveSession, lame: Lame | None = None, lame_mode: str = "auto",
                 drift: DriftDetector | None = None, raw_every: int = 0):
        if lame_mode not in LAME_MODES:
            raise ValueError(f"lame mode must be one of {LAME_MODES}, got {lame_mode!r}")
        self.session = session
        self.preprocess = Preprocessor(session.info.preprocess)
        self.lame = lame
        self.lame_mode = lame_mode if lame is not None else "off"
        self.correlation = CorrelationMonitor(len(session.info.labels))
        self.drift = drift or DriftDetector(session.info.layer_names)
        self.raw_every = raw_every
        self.adaptation = "on"
        self.counters = PipelineCounters()

    def set_adaptation(self, mode: str) -> None:
        """on: adapt and update; frozen: adapt with fixed components; off: the unadapted model."""
        if mode not in ADAPTATION_MODES:
            raise ValueError(f"adaptation must be one of {ADAPTATION_MODES}, got {mode!r}")
        self.adaptation = mode

    def reset(self) -> None:
        self.session.reset()
        if self.lame:
            self.lame.reset()

    @property
    def lame_active(self) -> bool:
        return self.lame_mode == "on" or (self.lame_mode == "auto" and self.correlation.correlated)

    def process(self, frame: Frame) -> FrameResult | None:
        """None when the frame is rejected (counted by reason)."""
        start = time.perf_counter()
        try:
            image = self.preprocess(frame.image)
        except FrameError as exc:
            self.counters.rejected[str(exc)] += 1
            if self.counters.rejected[str(exc)] == 1:
                log.warning("frame %d rejected: %s", frame.index, exc)
            return None
        out = self.session.step(image, adapt=self.adaptation != "off", update=self.adaptation == "on")
        adapted = softmax(out.logits)
        raw = None
        if self.adaptation == "off":
            raw = adapted
        elif self.raw_every and frame.index % self.raw_every == 0:
            raw = softmax(self.session.step(image, adapt=False).logits)
        top1 = int(np.argmax(adapted))
        self.correlation.update(top1)
        corrected = None if self.lame is None else self.lame.update(out.features, adapted)
        applied = corrected is not None and self.lame_active
        probs = corrected if applied else adapted
        event = self.drift.update(out.shift, frame.index, frame.captured)
        self.counters.processed += 1
        return FrameResult(frame.index, frame.captured, (time.perf_counter() - start) * 1000, probs, adapted, raw,
                           corrected, applied, float(out.shift.mean()), event)
