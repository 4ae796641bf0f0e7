"""Which frames the folded layout measures (runs the file's graph, which returns the frame's statistics) and
which answer from a bake (bakes.py): a pure policy, without onnxruntime, so that validating a config
loads no inference engine and the policy is tested on its own (tests/test_cadence.py)."""
from __future__ import annotations

# chosen by bench/latency.py, bench/quality.py and bench/camera.py
STATISTICS_EVERY = 11  # prime: a periodic stream is not sampled at one phase (docs/decisions.md)
# how far (mean per-layer KL) a bake may lag what the frames need, by learner: the anchor's correction is
# small and decisive, UnMix-TNS's normalisation moves with every frame's instance term
REBAKE_DIVERGENCE = {"anchor": 0.001, "unmix": 0.003}
SETTLE_MEASUREMENTS = 32


class MeasuringCadence:
    """`next(adapted)` once a frame says whether it measures and how many frames the measurement stands
    for (itself and the unmeasured ones before it; 0: it answers from a bake).

    Unadapted frames measure every `every`-th. With `settle` 0 so do adapted ones. With `settle` > 0
    (the camera anchor) adapted frames measure every frame while the normalisation follows a change, and
    every `every`-th once `settle` measurements in a row moved it less than `rebake` (`moved`); a
    measurement that moves it more than `follow` from the bake in use, or an unadapted frame that
    updates (the episode is over), returns to following."""

    def __init__(self, every: int = STATISTICS_EVERY, settle: int = 0, rebake: float = REBAKE_DIVERGENCE["anchor"],
                 follow: float | None = None):
        if every < 1 or settle < 0 or not rebake >= 0:
            raise ValueError(f"every must be >= 1, settle >= 0 and rebake >= 0, got {every}, {settle}, {rebake}")
        self.every, self.settle, self.rebake = every, settle, rebake
        self.follow = 10 * rebake if follow is None else follow
        self.unmeasured = {False: 0, True: 0}
        self.restart()

    def restart(self) -> None:
        self.following, self.steady = self.settle > 0, 0

    def next(self, adapted: bool, asked: bool = False) -> int:
        every = 1 if adapted and self.following else self.every
        self.unmeasured[adapted] += 1
        if not asked and self.unmeasured[adapted] < every:
            return 0
        frames, self.unmeasured[adapted] = self.unmeasured[adapted], 0
        return frames

    def moved(self, step: float, from_bake: float) -> None:
        """After an adapted measurement: how far it moved the normalisation (`step`), and how far that is from
        the bake in use (`from_bake`; mean per-layer KL both)."""
        if not self.settle:
            return
        if self.following:
            self.steady = self.steady + 1 if step <= self.rebake else 0
            self.following = self.steady < self.settle
        elif from_bake > self.follow:
            self.restart()
