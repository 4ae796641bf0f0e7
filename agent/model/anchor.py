"""Camera-anchored normalisation: what a camera's own clean frames teach its BatchNorm layers.

A fixed camera sees few scenes, so statistics gathered from its frames carry its content as much
as its conditions; normalising with them alone bends the model toward whatever it watches. This
learner keeps the content out by differencing: while the camera's conditions are its usual ones
(no drift episode) it learns each layer's statistics on this camera, the reference; while they
have changed (a drift episode) it tracks the current statistics and normalises with the source
statistics moved by the change only,

    mean = source_mean + depth_weight * (current_mean - reference_mean)
    var  = source_var * (current_var / reference_var) ** depth_weight

so the content both periods share cancels and what is left is the condition (fog, blur, noise,
darkness). The weight is the same for every layer (bench/camera.py chose it).

Its state lives in single-instance UnMix-TNS's components, so checkpoints keep their format:
component 0 holds the reference, component 1 the current conditions, their counts the frames
each has seen; the other components stay at the source statistics.
"""
from __future__ import annotations

import numpy as np

from ..contract import AdaptationSpec
from .mixture import LayerStatistics

STRENGTH = 0.5  # share of the change applied (bench/camera.py)
CURRENT_MOMENTUM = 0.1  # per frame: the current statistics follow a change within tens of frames
REFERENCE_FRAMES = 500  # the reference averages over this many frames, then follows this slowly
EPS = 1e-6


class CameraAnchor(LayerStatistics):
    """The learner of the folded layout's session (agent/model/folded_session.py): `update` with each
    measured frame's statistics, `statistics` for what to normalise with."""

    def __init__(self, spec: AdaptationSpec, source_stats: dict):
        if spec.components < 2:
            raise ValueError("the camera anchor keeps its reference and current statistics in two components")
        super().__init__(spec, source_stats)

    def set_state(self, state: dict) -> None:
        means = np.concatenate([state[n]["means"] for n in self.names], axis=1).astype(np.float32)
        variances = np.concatenate([state[n]["vars"] for n in self.names], axis=1).astype(np.float32)
        counts = np.concatenate([state[n]["counts"] for n in self.names], axis=1).astype(np.float32)
        self.reference = [means[0].copy(), variances[0].copy()]
        self.current = [means[1].copy(), variances[1].copy()]
        self.reference_frames, self.current_frames = float(counts[0].min()), float(counts[1].min())

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        means = np.tile(self.source_mean, (self.k, 1))
        variances = np.tile(self.source_var, (self.k, 1))
        means[0], variances[0] = self.reference
        means[1], variances[1] = self.current
        counts = np.zeros((self.k, len(self.names)), np.float32)
        counts[0], counts[1] = self.reference_frames, self.current_frames
        split = self.starts[1:]
        return {n: {"means": m.copy(), "vars": v.copy(), "counts": counts[:, [i]].copy()}
                for i, (n, m, v) in enumerate(zip(self.names, np.split(means, split, axis=1),
                                                  np.split(variances, split, axis=1)))}

    @property
    def learned(self) -> bool:
        """Whether the camera has shown its usual conditions long enough to anchor to them."""
        return self.reference_frames > 0

    def update(self, mu: np.ndarray, var_x: np.ndarray, strength: float = 1.0, frames: int = 1) -> None:
        """One measured frame standing for `frames`: at strength 0 (usual conditions) it teaches the
        reference and the current statistics restart from it; above 0 it moves the current ones."""
        if strength == 0:
            weight = min(frames / (self.reference_frames + frames), frames / REFERENCE_FRAMES) \
                if self.reference_frames else 1.0
            for target, x in zip(self.reference, (mu, var_x)):
                target += weight * (x - target)
            self.reference_frames += frames
            self.current = [self.reference[0].copy(), self.reference[1].copy()]
            self.current_frames = 0.0
            return
        if not self.learned:
            return
        weight = 1.0 - (1.0 - CURRENT_MOMENTUM) ** frames
        for target, x in zip(self.current, (mu, var_x)):
            target += weight * (x - target)
        self.current_frames += frames

    def departure(self, mu: np.ndarray, var_x: np.ndarray) -> np.ndarray | None:
        """Per layer, how far a frame's unadapted statistics are from the reference (agent/departure.py)."""
        return self.divergence(mu, var_x, *self.reference) if self.learned else None

    def statistics(self, mu: np.ndarray | None = None, var_x: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The source statistics moved by the change from the reference to the current statistics."""
        if not self.learned:
            return self.source_mean, self.source_var
        mean = self.source_mean + STRENGTH * (self.current[0] - self.reference[0])
        ratio = np.maximum(self.current[1], EPS) / np.maximum(self.reference[1], EPS)
        return mean.astype(np.float32), (self.source_var * ratio ** STRENGTH).astype(np.float32)
