"""Drift alerts: a change of the camera's imaging conditions, told apart from a change of what it sees.

A drift alert means the light, weather, focus, noise or lens changed, not that people walked
through the scene. Every frame gives four imaging statistics and a coarse picture of the view
(agent/imaging.py). The detector remembers the
views the camera shows (one for a fixed camera; a patrolling or panning camera's scenes) with
each view's usual statistics. A warm-up of `warmup` frames learns them and the spread of frames
around their own view's statistics (at least `min_spread`, so a still camera's tiny spread does
not turn a passer-by into an alarm). Each frame is compared with the view it shows: each
statistic's distance in spreads is smoothed over frames, and the score is the largest. A `start`
comes when the score passes `threshold`, an `update` every `update_every` frames or once the kind
of change has differed for `end_frames` frames, an `end` once the score has stayed under
`end_level` for `end_frames` frames.

Conditions keep the view (a fogged, darkened, blurred or noisy hall is still the same hall at
24x18); content that moves the statistics changes it. A frame that shows no known view is not
scored, and `view_frames` such frames in a row that agree with each other (a panning camera's
next scene) become a new view with their own statistics instead of raising an alert. While an
episode is open no new view is learnt.

With the camera anchor the model's own layers are read too (agent/departure.py): a frame's departure from
the camera's usual layer statistics opens an episode the imaging statistics miss (compression, pixelation),
named `model features`, which ends when the departure does.

A camera installed at night in infrared learns the infrared picture as its usual conditions. Its
reference is provisional while it is colourless: an episode whose frames are coloured region by
region (sensor noise colours a grey scene pixel by pixel only) `RELEARN_FRAMES` frames in a row
ends with reason `relearnt`, and the detector learns the camera's usual conditions again from the
frames that follow. A reference learnt by day is never replaced: it is in colour, or (a grey scene)
its colour never comes. Darkness alone is not read this way: noise or a brightness change lights a
dark scene as the day does.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from .departure import DepartureWatch
from .imaging import STATISTICS, VIEW_SIZE, Observation

# the words a subscriber reads for a statistic that fell (-1) or rose (+1)
DIRECTIONS = {("brightness", -1): "darker", ("brightness", 1): "brighter",
              ("contrast", -1): "lower contrast", ("contrast", 1): "higher contrast",
              ("sharpness", -1): "blurrier", ("sharpness", 1): "noisier",
              ("colour", -1): "less colour", ("colour", 1): "more colour"}
MAX_VIEWS = 64  # views a camera remembers (a patrolling camera's presets, a pan's stretches)
FOLLOW = 1 / 500  # per frame: how fast a view and its statistics follow a scene whose content slowly changes
NEW_VIEW_MEMORY = 50  # frames: a view learnt after the warm-up (a pan's stretch) averages only its latest frames
# a provisional (infrared) reference: colourfulness on the log scale of `imaging.observe`
COLOURLESS, COLOURED = np.log(3 + 4), np.log(8 + 4)  # an infrared reference, a frame in colour
RELEARN_FRAMES = 100  # lit, coloured frames in a row that replace a provisional reference
RELEARNT = "relearnt"  # the reason of the end that replaces a provisional reference
USUAL, APART, CONDITION = "usual", "apart", "condition"  # DriftDetector.fit
FEATURES = "model features"  # the condition word of an episode only the model's layers show (agent/departure.py)


@dataclass
class DriftEvent:
    type: str  # "start", "update" or "end"
    episode: str  # one id per drift episode, shared by its start/updates/end
    frame: int
    time: float  # unix seconds
    score: float  # the largest smoothed statistic distance from the reference, in spreads
    threshold: float  # the score a start needs (same scale)
    detector: str
    reason: str  # start: "changed"; update: "periodic" or "condition changed"; end: "cleared" or what closed it
    condition: list[str] = field(default_factory=list)  # e.g. ["darker", "lower contrast"]
    statistics: dict[str, float] = field(default_factory=dict)  # each statistic's smoothed distance, signed
    top_layers: list[dict] = field(default_factory=list)  # [{"layer": name, "z": shift in the source's spreads}]


class DriftDetector:
    def __init__(self, warmup: int = 100, threshold: float = 6.0, end_level: float = 3.0, end_frames: int = 30,
                 update_every: int = 100, smoothing: float = 0.1, min_spread: float = 0.03,
                 view_similarity: float = 0.6, view_frames: int = 5, layers: tuple[str, ...] = (), top_k: int = 3):
        if not threshold > end_level:
            raise ValueError(f"drift threshold ({threshold}) must be above end_level ({end_level})")
        self.warmup, self.threshold, self.end_level, self.end_frames = warmup, threshold, end_level, end_frames
        self.update_every, self.smoothing, self.min_spread = update_every, smoothing, min_spread
        self.view_similarity, self.view_frames = view_similarity, view_frames
        self.layers, self.top_k = tuple(layers), top_k
        self.detector = f"imaging-statistics(threshold={threshold}, end_level={end_level})"
        self.reset()

    def reset(self) -> None:
        """Forget the camera: learn its usual statistics again (an open episode is dropped)."""
        self.views = np.zeros((0, 2, VIEW_SIZE[0] * VIEW_SIZE[1]))  # (n, 2, 432) the views this camera shows
        self.references = np.zeros((0, len(STATISTICS)))  # (n, 4) each view's usual statistics
        self._weights = np.zeros(0)  # frames behind each view's reference
        self._memory = np.zeros(0)  # at most this many (warm-up views: no limit)
        self._used = np.zeros(0)  # when each view was last seen (the least recent goes first)
        self._warm: list[tuple[np.ndarray, int]] = []  # (statistics, view) of each warm-up frame
        self.spread: np.ndarray | None = None  # (4,) set when the warm-up ends
        self.warmup_views = 0  # views the warm-up saw: 1 for a fixed camera, more for a panning or patrolling one
        self._new_view: list[Observation] = []  # a run of frames that agree with each other, with no known view
        self.level = np.zeros(len(STATISTICS))  # smoothed signed distance per statistic, in spreads
        self.episode: str | None = None
        self.condition: list[str] = []
        self._calm = self._since_update = self._differs = self._frames = self._better = 0
        self._layer_z: np.ndarray | None = None
        self._relearning = False  # this warm-up follows a relearn: robust to a condition that comes during it
        self.departure = DepartureWatch(self.threshold)
        self.by_features = False  # the open episode is one only the model's layers showed: their departure ends it

    @property
    def active(self) -> bool:
        return self.episode is not None

    @property
    def fixed(self) -> bool:
        """A fixed camera: its warm-up showed one view (later views, passers-by standing still, do not count)."""
        return self.warmup_views == 1

    @property
    def provisional(self) -> bool:
        """Whether the usual conditions learnt are colourless (an infrared night's, or a grey scene's): colour,
        when it comes, replaces them."""
        return self.spread is not None and bool(np.any(self.references[:, 3] < COLOURLESS))

    def _looks_better(self, observation: Observation, view: int) -> bool:
        """A frame in colour where the view's reference is grey (measured on a coarse thumbnail: sensor noise
        gives a grey scene colour pixel by pixel, not region by region)."""
        return bool(self.references[view, 3] < COLOURLESS and observation.tint >= COLOURED)

    @property
    def score(self) -> float:
        """The largest smoothed statistic distance, or the layers' departure in an episode they opened."""
        return max(self.score_imaging, self.departure.score) if self.by_features else self.score_imaging

    @property
    def score_imaging(self) -> float:
        return float(np.abs(self.level).max())

    def fit(self, observation: Observation) -> str | None:
        """During an episode, where this frame, unsmoothed, stands against the known view it shows (None outside
        episodes). USUAL: every statistic within `end_level` spreads of the usual ones, the condition has cleared
        on this very frame (the episode ends only once the smoothed score has stayed low for `end_frames`).
        APART: nearer the usual statistics than the episode's smoothed distance (a dawn almost back at day,
        infrared turned at once into a dim dawn, faster than the smoothing follows), or in colour where the
        usual statistics are an infrared installation's. CONDITION otherwise, and for a frame of no known view."""
        if not self.active:
            return None
        similarity = np.einsum("nkd,kd->nk", self.views, observation.view).max(1)
        view = int(np.argmax(similarity))
        if similarity[view] < self.view_similarity:
            return CONDITION
        z = (observation.statistics - self.references[view]) / self.spread
        if np.abs(z).max() < self.end_level:
            if not self.by_features or self.departure.score < self.end_level:
                return USUAL
            # the layers have not been measured back yet: leaving, if the imaging statistics had seen the condition
            return APART if self.score_imaging >= self.end_level else CONDITION
        if np.linalg.norm(z - self.level) >= np.linalg.norm(z) or self._looks_better(observation, view):
            return APART
        return CONDITION

    def update(self, observation: Observation, frame: int, now: float | None = None,
               layer_z: np.ndarray | None = None, departure: np.ndarray | None = None) -> DriftEvent | None:
        """One frame; `layer_z` is the model's per-layer shift on it, when measured (for the payload), `departure`
        the per-layer KL of its unadapted statistics from the camera's usual ones, when measured."""
        self._frames += 1
        if layer_z is not None:
            self._layer_z = np.asarray(layer_z, np.float64)
        self.measure(departure)
        if self.spread is None:
            self._warm_up(observation)
            return None
        view = self._match(observation.view)
        if view is None:
            if self.episode is None:
                self._collect_new_view(observation)
            return None
        z = (observation.statistics - self.references[view]) / self.spread
        self.level += self.smoothing * (z - self.level)
        now = time.time() if now is None else now
        if self.episode is None:
            self._follow(view, observation)
            features = self.score <= self.threshold and self.departure.changed
            if self.score > self.threshold or features:
                self.episode = uuid.uuid4().hex[:12]
                self.by_features = features
                if not features:
                    self.departure.forget_score()
                self.condition = self._condition()
                self._calm = self._since_update = self._differs = self._better = 0
                return self._event("start", "changed", frame, now)
            return None
        self._since_update += 1
        self._calm = self._calm + 1 if self.score < self.end_level else 0
        if self._calm >= self.end_frames:
            event = self._event("end", "cleared", frame, now)
            self.episode, self.condition, self.by_features = None, [], False
            return event
        self._better = self._better + 1 if self._looks_better(observation, view) else 0
        if self._better >= RELEARN_FRAMES:
            event = self._event("end", RELEARNT, frame, now)
            self.reset()
            self._relearning = True
            return event
        condition = self._condition()
        self._differs = self._differs + 1 if condition and set(condition) != set(self.condition) else 0
        if self._differs >= self.end_frames:
            self.condition, self._since_update, self._differs = condition, 0, 0
            return self._event("update", "condition changed", frame, now)
        if self._since_update >= self.update_every:
            self._since_update = 0
            return self._event("update", "periodic", frame, now)
        return None

    def measure(self, departure: np.ndarray | None) -> None:
        """The model layers' departure from the camera's usual, when a frame measured it unadapted."""
        if departure is not None:
            self.departure.measure(departure, learn=self.episode is None)

    def _warm_up(self, observation: Observation) -> None:
        """Warm-up frames are taken as clean: each joins the view it shows (or starts one); the spread
        is how far frames sit from their own view's mean, so a panning camera's scenes do not widen it."""
        view = self._match(observation.view)
        if view is None:
            view = self._add(observation.view, observation.statistics)
        else:
            w = self._weights[view] = self._weights[view] + 1
            self.references[view] += (observation.statistics - self.references[view]) / w
        self._warm.append((observation.statistics, view))
        if len(self._warm) >= self.warmup:
            if self._relearning:
                self._robust_references()
            deviations = np.stack([s - self.references[v] for s, v in self._warm])
            spread = (1.4826 * np.median(np.abs(deviations), 0) if self._relearning
                      else np.sqrt((deviations ** 2).mean(0)))
            self.spread = np.maximum(spread, self.min_spread)
            self._relearning = False
            self.warmup_views = len(self.views)
            self._warm = []

    def _robust_references(self) -> None:
        """A relearn's warm-up starts whenever colour came, maybe with a condition close behind (the morning's fog):
        each view's usual statistics are the median of its frames, and the spread their median deviation."""
        for v in range(len(self.views)):
            mine = [s for s, w in self._warm if w == v]
            if mine:
                self.references[v] = np.median(mine, 0)

    def _match(self, view: np.ndarray) -> int | None:
        """The known view this frame shows, if any. Either thumbnail agreeing is enough: fog's haze moves
        the intensity one, snow the edge one."""
        if not len(self.views):
            return None
        similarity = np.einsum("nkd,kd->nk", self.views, view).max(1)
        best = int(np.argmax(similarity))
        if similarity[best] < self.view_similarity:
            return None
        self._used[best] = self._frames
        return best

    def _follow(self, view: int, observation: Observation) -> None:
        """Outside episodes a view follows what it shows. One learnt in the warm-up averages its frames,
        then follows slowly (a shelf restocked, a parked car gone), so that a condition coming on over a
        few hundred frames is still far from it; one learnt later (a pan's next stretch) keeps up with
        its latest NEW_VIEW_MEMORY frames."""
        self._weights[view] = min(self._weights[view] + 1, self._memory[view])
        rate = max(FOLLOW, 1 / self._weights[view])
        self.references[view] += rate * (observation.statistics - self.references[view])
        moved = self.views[view] + rate * (observation.view - self.views[view])
        self.views[view] = moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-6)

    def _collect_new_view(self, observation: Observation) -> None:
        """`view_frames` frames in a row that agree with each other and with no known view are a new
        view (a panning camera's next scene): their mean becomes its reference."""
        if self._new_view and float((self._new_view[-1].view * observation.view).sum(1).max()) < self.view_similarity:
            self._new_view = []
        self._new_view.append(observation)
        if len(self._new_view) >= self.view_frames:
            view = np.mean([o.view for o in self._new_view], axis=0)
            self._add(view, np.mean([o.statistics for o in self._new_view], axis=0))
            self._new_view = []

    def _add(self, view: np.ndarray, statistics: np.ndarray) -> int:
        if len(self.views) >= MAX_VIEWS:
            oldest = int(np.argmin(self._used))
            keep = np.arange(len(self.views)) != oldest
            self.views, self.references = self.views[keep], self.references[keep]
            self._weights, self._used, self._memory = self._weights[keep], self._used[keep], self._memory[keep]
        view = view / np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-6)
        self.views = np.concatenate([self.views, view[None]])
        self.references = np.concatenate([self.references, statistics[None]])
        self._weights = np.append(self._weights, 1.0)
        self._memory = np.append(self._memory, np.inf if self.spread is None else NEW_VIEW_MEMORY)
        self._used = np.append(self._used, self._frames)
        return len(self.views) - 1

    def _condition(self) -> list[str]:
        scored = [(abs(v), DIRECTIONS[s, 1 if v > 0 else -1]) for s, v in zip(STATISTICS, self.level)]
        if self.by_features:
            scored.append((self.departure.score, FEATURES))
        return [word for value, word in sorted(scored, key=lambda x: -x[0]) if value >= self.end_level]

    def _event(self, kind: str, reason: str, frame: int, now: float) -> DriftEvent:
        top = []
        if self._layer_z is not None and self.layers:
            order = np.argsort(-np.abs(self._layer_z))[: self.top_k]
            top = [{"layer": self.layers[i], "z": round(float(self._layer_z[i]), 2)} for i in order]
        return DriftEvent(kind, self.episode, frame, now, round(self.score, 2), self.threshold, self.detector, reason,
                          list(self.condition), {s: round(float(v), 2) for s, v in zip(STATISTICS, self.level)}, top)

    # -- carried over a reload or a restart ---------------------------------------------------
    def state(self) -> dict | None:
        """What a restarted agent needs to go on with this camera (JSON-ready); None while warming up."""
        if self.spread is None:
            return None
        return {"views": np.round(self.views, 4).tolist(), "references": self.references.tolist(),
                "spread": self.spread.tolist(), "level": self.level.tolist(), "episode": self.episode,
                "condition": self.condition, "warmup_views": self.warmup_views,
                "departure": self.departure.state(), "by_features": self.by_features}

    def restore(self, state: dict) -> None:
        """Go on from `state()`; a state that does not fit this detector (another version's, a damaged one)
        raises ValueError naming what is wrong, and leaves the detector as it was."""
        views, references, spread, level = _checked(state)
        departure = DepartureWatch(self.threshold)
        departure.restore(state.get("departure"))  # absent from an earlier version's state: learnt again
        self.reset()
        self.departure, self.by_features = departure, bool(state.get("by_features", False))
        self.views, self.references, self.spread, self.level = views, references, spread, level
        self._weights, self._used = np.full(len(self.views), 1 / FOLLOW), np.zeros(len(self.views))
        self._memory = np.full(len(self.views), np.inf)
        self.episode, self.condition = state["episode"], list(state["condition"])
        self.warmup_views = int(state.get("warmup_views", len(self.views)))


def _checked(state) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of a saved detector state, each checked against this version's shapes."""
    if not isinstance(state, dict):
        raise ValueError(f"a detector state is a mapping, got {type(state).__name__}")
    missing = {"views", "references", "spread", "level", "episode", "condition"} - set(state)
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    n = len(STATISTICS)

    def array(key: str, shape: tuple) -> np.ndarray:
        try:
            a = np.asarray(state[key], np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{key} is not an array of numbers") from None
        if a.shape != shape or not np.all(np.isfinite(a)):
            raise ValueError(f"{key} has shape {a.shape}, this version expects {shape} of finite numbers")
        return a

    count = len(state["views"]) if isinstance(state["views"], list) else -1
    if not 1 <= count <= MAX_VIEWS:
        raise ValueError(f"views holds {count} views, this version keeps 1 to {MAX_VIEWS}")
    views = array("views", (count, 2, VIEW_SIZE[0] * VIEW_SIZE[1]))
    references = array("references", (count, n))
    spread, level = array("spread", (n,)), array("level", (n,))
    if not np.all(spread > 0):
        raise ValueError("spread holds a value that is not positive")
    if state["episode"] is not None and not isinstance(state["episode"], str):
        raise ValueError("episode is neither an id nor null")
    if not isinstance(state["condition"], list) or not all(isinstance(c, str) for c in state["condition"]):
        raise ValueError("condition is not a list of words")
    warmup = state.get("warmup_views", count)
    if not isinstance(warmup, int) or not 1 <= warmup <= count:
        raise ValueError(f"warmup_views {warmup!r} is not a view count")
    return views, references, spread, level
