"""The folded layout's session: the graph normalises with statistics it is given and returns the frame's own;
the learner (the camera anchor, or UnMix-TNS) runs in numpy, the cadence says which frames measure, and the
rest answer from bakes."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import contract
from ..contract import ModelInfo, read_model_info
from ..onnxruntime_quiet import ort
from .adaptive import StepOutput, check_strength
from .anchor import CameraAnchor
from .bakes import BakedNormalisation
from .cadence import REBAKE_DIVERGENCE, SETTLE_MEASUREMENTS, STATISTICS_EVERY, MeasuringCadence
from .mixture import RobustMixture
from .providers import CPU, OnnxSession, bind_output

log = logging.getLogger(__name__)

LEARNERS = {"anchor": CameraAnchor, "unmix": RobustMixture}  # the folded layout's, by adaptation.method


@dataclass
class _Bake:
    """A session that normalises every frame with constant statistics (bakes.py)."""
    strength: float
    mean: np.ndarray
    var: np.ndarray
    session: ort.InferenceSession


class FoldedSession(OnnxSession):
    """The folded layout (exporters/folded.py): the graph normalises with `norm.mean/var` and returns the
    frame's statistics; the learner runs here, all layers in one vectorised numpy step.

    `learner`: `anchor` (anchor.CameraAnchor, the default) or `unmix` (mixture.RobustMixture). The cadence
    (cadence.MeasuringCadence) says which frames measure: they run the graph normalised as the learner says
    (their answer), and their statistics update the learner (a measurement standing for several frames
    decays UnMix-TNS's components for all of them). The other frames answer from the bake: the network with
    the normalisation in use baked in, rebuilt once a measurement has moved what they need more than
    `rebake_divergence` (mean per-layer KL; by default the learner's own) from it. An unadapted frame
    beside an adapted one (the unadapted pass every `raw_every` frames, a gate's shadow) runs the graph at
    the source statistics rather than rebuild the bake. So a camera holds two onnxruntime sessions, the
    graph and one bake. `statistics_every` 1: every frame runs the graph. Components and checkpoints are
    the robust layout's."""

    LAYOUT = "folded"
    METHODS = tuple(LEARNERS)  # what adaptation.method may name for this layout; the first is `auto`
    OUTPUTS = (contract.LOGITS, contract.FEATURES, contract.STATS)
    BAKED_OUTPUTS = (contract.LOGITS, contract.FEATURES)

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, seed: int = 0,
                 info: ModelInfo | None = None, statistics_every: int = STATISTICS_EVERY,
                 rebake_divergence: float | None = None, learner: str = "unmix"):
        if learner not in LEARNERS:
            raise ValueError(f"learner must be one of {', '.join(LEARNERS)}, got {learner!r}")
        rebake_divergence = REBAKE_DIVERGENCE[learner] if rebake_divergence is None else rebake_divergence
        if statistics_every < 1 or not rebake_divergence >= 0:
            raise ValueError(f"statistics_every must be >= 1 and rebake_divergence >= 0, got {statistics_every}, "
                             f"{rebake_divergence}")
        info = info or read_model_info(path)
        self.statistics_every, self.rebake_divergence = statistics_every, rebake_divergence
        self.learner = LEARNERS[learner](info.adaptation, info.source_stats)
        self._settle = SETTLE_MEASUREMENTS if learner == "anchor" else 0
        self.bakes = 0  # bakes built
        super().__init__(path, device=device, threads=threads, seed=seed, info=info)
        # the network with constant normalisation, for the frames that measure nothing (None: every frame measures)
        self.baker = (BakedNormalisation(path, (self.learner.source_mean, self.learner.source_var),
                                         self._session_options, self.session.get_providers())
                      if statistics_every > 1 else None)

    @classmethod
    def open(cls, path: str | Path, info: ModelInfo, method: str, statistics_every: int,
             rebake_divergence: float | None, **placement) -> FoldedSession:
        """sessions.open_session's way in."""
        return cls(path, info=info, statistics_every=statistics_every, rebake_divergence=rebake_divergence,
                   learner=method, **placement)

    def _set_state(self, state: dict) -> None:
        self.learner.set_state(state)
        self.cadence = MeasuringCadence(self.statistics_every, self._settle, self.rebake_divergence)
        self._last = None  # the last measured frame's statistics (a gate shadow's too), for the instance term
        self._normalised: tuple[float, tuple[np.ndarray, np.ndarray]] | None = None  # (strength, _normalisation)
        self._bake = None  # built for other statistics: a restored session runs as a fresh one would
        self._stale = False  # a measurement has moved the adapted frames' normalisation past the bake's
        self._previous = 0.0  # the last step's strength: an unadapted step after an adapted one is a pass beside it

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return self.learner.state()

    @property
    def last_statistics(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last measured frame's statistics (mean, variance of every adapted layer's input), if any."""
        return self._last

    @property
    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """What the next adapted frame (at full strength) is normalised with."""
        return self._normalisation(1.0)

    @property
    def baked_statistics(self) -> tuple[np.ndarray, np.ndarray] | None:
        """What the bake in use normalises with; None: no bake yet."""
        return None if self._bake is None else (self._bake.mean, self._bake.var)

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True, measure: bool = False) -> StepOutput:
        check_strength(strength)
        adapted = strength > 0
        beside, self._previous = not adapted and self._previous > 0, strength
        if not adapted and update:
            self.cadence.restart()  # back in its usual conditions: the next episode is followed from its start
        # an unadapted pass beside an adapted frame (the unadapted cadence, replay's scoring) leaves the cadence alone
        frames = 0 if beside and not measure else self.cadence.next(adapted, asked=measure or self.baker is None)
        normalisation = self._normalisation(strength)
        image = np.ascontiguousarray(image, np.float32)
        bake = None if frames else self._bake_for(strength, normalisation, beside)
        if bake is None:
            self._run_or_fall_back(lambda: self._run_graph(image, *normalisation))
        else:
            self._run_or_fall_back(lambda: self._run_bake(image, bake))
        shift, departure = self._learn(strength, normalisation, update, frames) if frames else (None, None)
        self.frames += adapted and update
        out = self._outputs
        return StepOutput(out[contract.LOGITS][0].copy(), out[contract.FEATURES][0].copy(), shift, departure)

    def _normalisation(self, strength: float) -> tuple[np.ndarray, np.ndarray]:
        """Kept until the learner or the instance term change."""
        m = self.learner
        if strength == 0:
            return m.source_mean, m.source_var
        if self._normalised is None or self._normalised[0] != strength:
            mean, var = m.statistics(*(self._last or (None, None)))
            self._normalised = (strength, (m.source_mean + strength * (mean - m.source_mean),
                                           m.source_var + strength * (var - m.source_var)))
        return self._normalised[1]

    def _bake_for(self, strength: float, normalisation: tuple[np.ndarray, np.ndarray], beside: bool) -> _Bake | None:
        """The bake for this frame: the source one for unadapted frames, for adapted ones the last measurement's
        normalisation (rebuilt once a measurement has moved it past `rebake_divergence`); None: run the graph."""
        bake = self._bake
        if bake is not None and (bake.strength == 0) == (strength == 0) and not (strength and self._stale):
            return bake
        if beside:
            return None
        self._bake = None  # the old one goes before the new one is built
        try:
            self._bake = self._run_or_fall_back(lambda: _Bake(strength, *normalisation,
                                                              self.baker.session(*normalisation)))
        except Exception as exc:  # onnxruntime's own types (out of memory): the graph answers, the next frame retries
            log.warning("building a baked session failed (%s: %s); this frame runs the graph", type(exc).__name__,
                        str(exc)[:200])
            return None
        self.bakes += 1
        self._stale = False
        return self._bake

    def _divergence(self, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
        return float(self.learner.divergence(*a, *b).mean())

    def _learn(self, strength: float, normalisation: tuple[np.ndarray, np.ndarray], update: bool, frames: int
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """A measured frame's statistics: the instance term, and the learner's update. Unadapted ones teach
        the camera anchor its reference, after their departure from it is taken."""
        stats = self._outputs[contract.STATS]
        mu, var_x = stats[0].copy(), stats[1].copy()
        self._last, self._normalised = (mu, var_x), None
        anchored = isinstance(self.learner, CameraAnchor)
        departure = self.learner.departure(mu, var_x) if anchored and strength == 0 else None
        if update and (strength > 0 or anchored):
            # each anchored measurement moves its current statistics by the same share, whatever it stands for:
            # once settled they average over more frames, as noisy as while following
            self.learner.update(mu, var_x, strength, frames=1 if anchored and strength > 0 else frames)
        if strength > 0:
            moved_to = self._normalisation(strength)
            bake = self._bake if self._bake is not None and self._bake.strength > 0 else None
            from_bake = float("inf") if bake is None else self._divergence(moved_to, (bake.mean, bake.var))
            self._stale = from_bake > self.rebake_divergence
            self.cadence.moved(self._divergence(moved_to, normalisation), from_bake)
        return self.learner.shift(mu, var_x), departure

    def _run_graph(self, image: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
        binding = self.session.io_binding()
        for name, value in ((contract.IMAGE, image), (contract.NORM_MEAN, mean), (contract.NORM_VAR, var)):
            binding.bind_cpu_input(name, value)
        for name, array in self._outputs.items():
            bind_output(binding, name, array)
        self.session.run_with_iobinding(binding)

    def _run_bake(self, image: np.ndarray, bake: _Bake) -> None:
        binding = bake.session.io_binding()
        binding.bind_cpu_input(contract.IMAGE, image)
        for name in self.BAKED_OUTPUTS:
            bind_output(binding, name, self._outputs[name])
        bake.session.run_with_iobinding(binding)

    def _fall_back(self, exc: Exception) -> None:
        """The bake is rebuilt on the CPU with the statistics it had."""
        super()._fall_back(exc)
        if self.baker is None:
            return
        self.baker.providers = [CPU]
        if self._bake is not None:
            self._bake.session = self.baker.session(self._bake.mean, self._bake.var)
