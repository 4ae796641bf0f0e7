"""One camera's per-frame work: preprocess -> adaptive model -> drift -> LAME, as a small stateful object.

The loops (replay, daemon) feed frames to `process` (or a whole stream to `stream`) and hand the
results to their sinks (progress bar, report, MQTT); nothing here knows where frames come from or go.
`open_camera_session` and `build_pipeline` make what a camera runs from a config: the daemon,
`tta-agent replay` and the benchmarks all build it there, so what is measured is what is published.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .config import layout_problem
from .contract import ContractError, ModelInfo, read_model_info
from .drift import APART, CONDITION, RELEARNT, USUAL, DriftDetector, DriftEvent
from .gate import AdaptationGate, CollapseGuard
from .imaging import Observation, observe
from .lame import CorrelationMonitor, Lame
from .model.adaptive import AdaptiveModel, StepOutput
from .model.anchor import CameraAnchor
from .model.providers import physical_cores
from .model.sessions import open_session
from .preprocess import FrameError, Preprocessor
from .sources import Frame
from .vocabulary import ADAPTATION_MODES, LAME_MODES

if TYPE_CHECKING:
    from .config import Config

PROBE_EVERY = 11  # frames: how often an episode only the model's layers showed measures them unadapted
log = logging.getLogger(__name__)


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
    raw: np.ndarray | None  # the unadapted model (source statistics) when this frame ran it
    strength: float  # adaptation strength used for this frame (0: the unadapted model)
    corrected: np.ndarray | None  # LAME over the window (None when LAME is off)
    lame_applied: bool  # whether probs is the LAME output (auto: only on label-correlated streams)
    shift: float | None  # mean per-layer shift score; None when the frame measured no statistics
    drift_score: float  # the drift detector's score after this frame (drift.DriftDetector.score)
    drift: DriftEvent | None = None


@dataclass
class _Inferred:
    """A frame's result before LAME (probs = adapted, no correction, no latency yet), with what LAME reads."""
    result: FrameResult
    features: np.ndarray
    lame_active: bool
    start: float


@dataclass
class PipelineCounters:
    processed: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> frames

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class CameraPipeline:
    def __init__(self, session: AdaptiveModel, lame: Lame | None = None, lame_mode: str = "auto",
                 drift: DriftDetector | None = None, raw_every: int = 0, gate: AdaptationGate | None = None,
                 guard: CollapseGuard | None = None):
        """`gate` None adapts at full strength on every frame (the ungated UnMix-TNS); `guard` watches
        the frames that have an unadapted pass too (gate shadows, raw_every)."""
        if lame_mode not in LAME_MODES:
            raise ValueError(f"lame mode must be one of {LAME_MODES}, got {lame_mode!r}")
        self.session = session
        self.preprocess = Preprocessor(session.info.preprocess)
        self.lame = lame
        self.lame_mode = lame_mode if lame is not None else "off"
        self.correlation = CorrelationMonitor(len(session.info.labels))
        self.drift = drift or DriftDetector(layers=session.info.layer_names)
        self.raw_every = raw_every
        self.score_unadapted = False  # replay with labels: the unadapted model on every frame, to score it only
        self.gate = gate
        self.guard = guard
        self.paused = 0  # frames left without adaptation after the guard fired
        self.anchored = False  # the session's learner is the camera anchor (configure)
        self.looks_usual = False  # the latest frame showed the camera's usual imaging statistics
        self.adaptation = "on"
        self.counters = PipelineCounters()

    def configure(self, config: Config) -> None:
        """Take the config's adaptation, LAME and drift sections (at start, and again on SIGHUP); the drift
        detector's reference and open episode carry over, the modes are set to the config's."""
        info, advanced = self.session.info, config.advanced
        a, c = advanced.adaptation, advanced.lame
        self.lame = None if config.lame.mode == "off" else Lame(window=c.window, affinity=c.affinity, k=c.knn)
        self.lame_mode = config.lame.mode
        carried = self.drift.state()
        self.drift = DriftDetector(layers=info.layer_names, **advanced.drift.model_dump())
        if carried is not None:
            self.drift.restore(carried)
        self.raw_every = a.raw_every
        self.anchored = isinstance(getattr(self.session, "learner", None), CameraAnchor)
        if a.gate.enabled and not self.anchored and info.shift_reference is None:
            raise ContractError(f"advanced.adaptation.gate.enabled: {info.path} has no shift reference "
                                "(tta.shift_reference, written by tta-export); re-export the model or set "
                                "advanced.adaptation.gate.enabled: false")
        g = a.gate
        self.gate = AdaptationGate(info.shift_reference, g.low, g.high, g.smoothing, g.shadow_every, g.margin) \
            if g.enabled and not self.anchored else None
        self.guard = CollapseGuard(len(info.labels), a.guard.window, a.guard.margin, a.guard.hold) \
            if a.guard.enabled else None
        self.set_adaptation(config.adaptation.mode)

    def set_adaptation(self, mode: str) -> None:
        """on: adapt and update; frozen: adapt with fixed components; off: the unadapted model."""
        if mode not in ADAPTATION_MODES:
            raise ValueError(f"adaptation must be one of {ADAPTATION_MODES}, got {mode!r}")
        self.adaptation = mode

    def reset(self) -> None:
        self.session.reset()
        if self.lame:
            self.lame.reset()
        if self.gate:
            self.gate.reset()
        if self.guard:
            self.guard.reset()
        self.paused = 0

    @property
    def strength(self) -> float:
        """The camera anchor adapts a fixed camera during drift episodes (its conditions have changed)
        and learns the camera's usual statistics outside them; a moving camera's content changes with
        its view, which differencing cannot tell from a condition (bench/camera.py), so it is left
        unadapted. UnMix-TNS adapts as far as its gate says."""
        if self.adaptation == "off" or self.paused:
            return 0.0
        if self.anchored:
            return float(self.drift.active and self.drift.fixed and not self.looks_usual)
        return 1.0 if self.gate is None else self.gate.strength

    @property
    def learns(self) -> bool:
        """Whether this frame may update the session. The camera anchor's unadapted frames teach its reference,
        the camera's usual conditions: never while a drift episode is open (a moving camera's, one paused by
        the guard, or one whose condition has just cleared)."""
        return self.adaptation == "on" and not (self.anchored and self.drift.active and self.strength == 0)

    @property
    def lame_active(self) -> bool:
        return self.lame_applies(self.strength)

    def lame_applies(self, strength: float) -> bool:
        """Whether LAME corrects a frame answered at `strength`. auto: while the answers come in runs, and on an
        anchored camera only on adapted frames: its unadapted answers are the model's own, which LAME moved
        below unadapted on clean real footage (bench/results/footage.md)."""
        if self.lame_mode != "auto":
            return self.lame_mode == "on"
        return self.correlation.correlated and not (self.anchored and strength == 0)

    def process(self, frame: Frame) -> FrameResult | None:
        """None when the frame is rejected (counted by reason)."""
        inferred = self._infer(frame)
        return None if inferred is None else self._correct(inferred)

    def stream(self, frames: Iterable[Frame]) -> Iterator[FrameResult]:
        """process() over a stream, pipelined: while a frame runs through the model, a worker thread
        finishes the frame before it (LAME) and preprocesses the frame after it (onnxruntime, OpenCV
        and numpy's loops release the GIL), so on a box with a core to spare neither costs
        throughput. Results come in frame order, equal to process()'s; the pipeline must not be
        reset while a stream runs."""
        with ThreadPoolExecutor(1, thread_name_prefix="pipeline") as worker:
            pending: Future[FrameResult] | None = None
            for frame, prepared, start in self._prepared(frames, worker):
                inferred = self._infer(frame, prepared, start)
                if inferred is None:
                    continue
                if pending is not None:
                    yield pending.result()
                pending = worker.submit(self._correct, inferred)
            if pending is not None:
                yield pending.result()

    def _prepared(self, frames: Iterable[Frame], worker: ThreadPoolExecutor
                  ) -> Iterator[tuple[Frame, Future, float]]:
        """Each frame with its preprocessing submitted one frame ahead of its turn."""
        ahead = None
        for frame in frames:
            current = (frame, worker.submit(self._prepare, frame.image), time.perf_counter())
            if ahead is not None:
                yield ahead
            ahead = current
        if ahead is not None:
            yield ahead

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, Observation]:
        """The model's input and what the drift detector reads, from one camera frame."""
        return self.preprocess(image), observe(image)

    def _infer(self, frame: Frame, prepared: Future | None = None, start: float | None = None
               ) -> _Inferred | None:
        """`prepared`: the frame's preprocessing already under way (stream), else it is done here."""
        start = time.perf_counter() if start is None else start
        try:
            image, observation = self._prepare(frame.image) if prepared is None else prepared.result()
        except FrameError as exc:
            self.counters.rejected[str(exc)] += 1
            if self.counters.rejected[str(exc)] == 1:
                log.warning("frame %d rejected: %s", frame.index, exc)
            return None
        fit = self.drift.fit(observation) if self.anchored else None
        probe = None
        if self.anchored and self.drift.by_features and (fit == APART or fit == CONDITION
                                                         and frame.index % PROBE_EVERY == 0):
            # an episode only the model's layers showed ends when they do: an unadapted pass measures them, at once
            # on a frame that looks back to the usual
            probe = self.session.step(image, strength=0.0, update=False, measure=True)
            self.drift.measure(probe.departure)
            fit = self.drift.fit(observation)
        self.looks_usual = fit == USUAL
        strength = self.strength
        # a frame the anchor's condition does not fit (leaving it, or turned into another) is answered unadapted,
        # and measured adapted so that the condition's statistics follow it
        leaving = strength > 0 and fit == APART
        if strength == 0 and probe is not None:
            out = probe
        else:
            out = self.session.step(image, strength=strength, update=self.learns, measure=leaving)
        unadapted = out if strength == 0 else probe
        if leaving:
            unadapted = probe or self.session.step(image, strength=0.0, update=False)
            out, strength = StepOutput(unadapted.logits, unadapted.features, out.shift), 0.0
        adapted = softmax(out.logits)
        gate_shadow = self.gate is not None and self.gate.needs_shadow(frame.index)
        compared = bool(self.raw_every) and frame.index % self.raw_every == 0
        if unadapted is None and (gate_shadow or compared or self.score_unadapted):
            unadapted = self.session.step(image, strength=0.0, measure=gate_shadow, update=False)
        if unadapted is not None and unadapted.shift is not None and self.gate is not None:
            self.gate.update(unadapted.shift, frame.index)
        raw = None if unadapted is None else softmax(unadapted.logits)
        self.paused = max(0, self.paused - 1)
        if self.guard is not None and compared:
            self._guard(frame.index, strength, adapted, raw)
        self.correlation.update(int(np.argmax(adapted)))
        measured = out.shift is not None
        event = self.drift.update(observation, frame.index, frame.captured,
                                  self._layer_z(out.shift) if measured else None,
                                  None if out is probe else out.departure)
        if event is not None and event.reason == RELEARNT:
            log.warning("frame %d: this camera's usual conditions were learnt in infrared and it now sees colour; "
                        "learning them again from the frames that follow", frame.index)
            self.reset()
        self.counters.processed += 1
        result = FrameResult(frame.index, frame.captured, 0.0, adapted, adapted, raw, strength, None, False,
                             float(out.shift.mean()) if measured else None, self.drift.score, event)
        return _Inferred(result, out.features, self.lame_applies(strength), start)

    def _guard(self, index: int, strength: float, adapted: np.ndarray, raw: np.ndarray) -> None:
        """The collapse guard, fed on the unadapted cadence's frames alone: the same in the daemon and in replay."""
        if strength == 0:
            if not self.drift.active:
                self.guard.usual(raw)
        elif self.guard.update(adapted, raw):
            log.warning("frame %d: the adapted answers left this camera's usual answers far more than the unadapted "
                        "model's did (a collapse); components reset, adaptation paused for %d frames", index,
                        self.guard.hold)
            self.session.reset()
            self.paused = self.guard.hold

    def _layer_z(self, shift: np.ndarray) -> np.ndarray:
        """Per-layer shift in the source's clean spreads (the exporter's reference), for drift payloads."""
        reference = self.session.info.shift_reference
        return np.log1p(np.maximum(shift, 0.0)) if reference is None else reference.standardise(shift)

    def _correct(self, x: _Inferred) -> FrameResult:
        result = x.result
        if self.lame is not None:
            result.corrected = self.lame.update(x.features, result.adapted)
            result.lame_applied = x.lame_active
            if result.lame_applied:
                result.probs = result.corrected
        result.latency_ms = (time.perf_counter() - x.start) * 1000
        return result


def open_camera_session(config: Config, info: ModelInfo | None = None) -> AdaptiveModel:
    """The adaptive model session a camera runs under `config` (model and adaptation sections)."""
    model, advanced = config.model, config.advanced
    a, folded = advanced.adaptation, advanced.adaptation.folded
    info = info or read_model_info(model.path)
    problem = layout_problem(config, info.adaptation.layout, model.path)
    if problem:
        raise ContractError(problem)
    return open_session(model.path, device=model.device, backend=advanced.model.backend,
                        threads=advanced.model.threads or physical_cores(), seed=a.seed, info=info,
                        statistics_every=folded.statistics_every, rebake_divergence=folded.rebake_divergence,
                        method=a.method)


def build_pipeline(config: Config, session: AdaptiveModel | None = None) -> CameraPipeline:
    """The pipeline a camera runs under `config`: gate, collapse guard, LAME, drift, the unadapted cadence
    and the modes, around `session` (opened from the config when not given)."""
    pipeline = CameraPipeline(session or open_camera_session(config))
    pipeline.configure(config)
    return pipeline
