"""One adaptive model in an onnxruntime session, with its UnMix-TNS components carried frame to frame.

The components live in two preallocated sets of arrays bound with IOBinding: each frame
reads one set and writes the other, then they swap, so nothing is allocated or copied
per frame. When the accelerator fails mid-run the session is rebuilt on the CPU with the
same components and the reason is kept for status reports.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from . import contract
from .anchor import CameraAnchor
from .baked import CPU, BakedNormalisation
from .cadence import REBAKE_DIVERGENCE, STATISTICS_EVERY
from .config import BACKENDS, DEVICES
from .contract import ModelInfo, read_model_info
from .onnxruntime_quiet import ort
from .state import initial_state, load_state, save_state
from .unmix import RobustMixture

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass
class StepOutput:
    logits: np.ndarray  # (classes,)
    features: np.ndarray  # (D,)
    shift: np.ndarray | None  # (layers,); None on a frame that measured no statistics (FoldedSession)


@runtime_checkable
class AdaptiveModel(Protocol):
    """What a camera's pipeline runs: one frame at a time, carrying its adaptation from frame to frame.

    Implemented by AdaptiveSession (graph layout), FoldedSession (folded layout) and the exporter's
    TorchSession; tests/test_sessions.py holds every kind to it."""

    info: ModelInfo
    frames: int  # adapted frames that updated the state
    fallbacks: int  # accelerator failures carried over to the CPU
    fallback_reason: str | None
    provider_reason: str

    @property
    def provider(self) -> str: ...

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]: ...

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True,
             measure: bool = False) -> StepOutput:
        """`strength` 0 is the unadapted model; `update=False` leaves the state alone (frozen, off)."""
        ...

    def reset(self) -> None: ...

    def save(self, path: str | Path) -> None: ...

    def load(self, path: str | Path) -> None: ...


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"adaptation strength must be in [0, 1], got {strength}")


@dataclass
class ProviderChoice:
    providers: list[str]
    reason: str  # why this choice, in words for logs and status


def choose_providers(device: str, available: list[str] | None = None) -> ProviderChoice:
    """`auto` and `cuda` take a GPU provider when this onnxruntime offers one, else the CPU, saying why."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers() if available is None else available
    if device == "cpu":
        return ProviderChoice([CPU], "cpu requested")
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if not gpu:
        return ProviderChoice([CPU], f"{device} requested but this onnxruntime offers no GPU provider "
                                     f"(available: {', '.join(available)}); running on the CPU")
    return ProviderChoice(gpu + [CPU], f"{device} requested; trying {gpu[0]}")




def open_session(path: str | Path, device: str = "auto", backend: str = "auto", threads: int | None = None,
                 seed: int = 0, info: ModelInfo | None = None, statistics_every: int = STATISTICS_EVERY,
                 rebake_divergence: float = REBAKE_DIVERGENCE, method: str = "auto"):
    """onnxruntime, unless torch is asked for, or `cuda` is asked for and torch is the only way to a
    GPU here (onnxruntime without a GPU provider). torch is imported only in those two cases.
    `statistics_every` / `rebake_divergence` are the folded layout's cadence (FoldedSession); the graph
    layout measures every frame. `method`: the folded layout's learner (`auto`: the camera anchor); the
    graph layout runs UnMix-TNS in its graph."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    info = info or read_model_info(path)
    if backend == "auto" and device == "cuda" and choose_providers("cuda").providers == [CPU] \
            and info.adaptation.layout == "graph":
        from importlib.util import find_spec

        if find_spec("torch") is not None:
            backend = "torch" if torch_backend().torch_cuda_available() else "onnxruntime"
    if backend == "torch":
        return torch_backend().TorchSession(path, device=device, threads=threads, seed=seed, info=info)
    learner = resolve_method(method, info)
    if info.adaptation.layout == "folded":
        return FoldedSession(path, device=device, threads=threads, seed=seed, info=info,
                             statistics_every=statistics_every, rebake_divergence=rebake_divergence,
                             learner=learner)
    return AdaptiveSession(path, device=device, threads=threads, seed=seed, info=info)


def torch_backend():
    """The torch backend lives with the torch code (exporters/torch_session.py); the agent finds it by its
    entry point, so a box without the exporter runs onnxruntime alone and says what is missing."""
    from importlib.metadata import entry_points

    found = entry_points(group="tta_agent.backends", name="torch")
    if not found:
        raise contract.ContractError("advanced.model.backend: torch needs the exporter installed (pip install -e "
                                     "'.[export]'); or use advanced.model.backend: onnxruntime")
    return next(iter(found)).load()


def resolve_method(method: str, info: ModelInfo) -> str:
    """`auto`: the camera anchor where the layout allows it (folded), UnMix-TNS in the graph otherwise."""
    folded = info.adaptation.layout == "folded"
    if method == "auto":
        return "anchor" if folded else "unmix"
    if method == "anchor" and not folded:
        raise contract.ContractError(f"advanced.adaptation.method: anchor needs a folded-layout model; {info.path} "
                                     "runs UnMix-TNS inside its graph (tta-export --layout folded, or method: auto)")
    if method not in LEARNERS:
        raise ValueError(f"adaptation method must be auto or one of {', '.join(LEARNERS)}, got {method!r}")
    return method


def physical_cores() -> int:
    """Physical cores (not hyper-threads): the default intra-op thread count for edge boxes."""
    try:
        cores = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "core id" in block:
                    cores.add((block.get("physical id", "0"), block["core id"]))
                block = {}
            elif ":" in line:
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


class Checkpoints:
    """reset/save/load for a session that keeps `info`, `seed`, `frames`, a `state` property and
    `_set_state` (both backends)."""

    def reset(self) -> None:
        """Back to the initial components (from the source statistics and the seed)."""
        self._set_state(initial_state(self.info.adaptation, self.info.source_stats, self.seed))
        self.frames = 0

    def save(self, path: str | Path) -> None:
        save_state(path, self.state, self.info.adaptation, frames=self.frames)

    def load(self, path: str | Path) -> None:
        state, meta = load_state(path, self.info.adaptation)
        self._set_state(state)
        self.frames = int(meta.get("frames", 0))


class OnnxSession(Checkpoints):
    """One model file in onnxruntime on the chosen providers, carried over to the CPU when the
    accelerator fails. Subclasses (the two layouts) keep the components and run `step`; `OUTPUTS`
    are read every frame into preallocated arrays."""

    OUTPUTS: tuple[str, ...] = ()

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 seed: int = 0, info: ModelInfo | None = None):
        self.path = Path(path)
        self.info = info or read_model_info(path)
        self.threads = threads
        self.seed = seed
        self.fallback_reason: str | None = None
        self.fallbacks = 0
        choice = choose_providers(device)
        self.session = self._open(choice.providers)
        self.provider_reason = choice.reason
        if choice.providers[0] != CPU and self.provider != choice.providers[0]:
            # onnxruntime only warns when a provider fails to load; say so plainly
            self.provider_reason = (f"{choice.providers[0]} failed to initialise (no usable GPU); "
                                    f"running on {self.provider}")
        log.info("model %s on %s (%s)", self.path.name, self.provider, self.provider_reason)
        self._outputs = {name: np.empty(shape, np.float32) for name, shape in self._output_shapes().items()}
        self.frames = 0
        self.reset()

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the folded layout's source statistics are metadata to the graph: no warnings
        # no per-session arena: the folded layout keeps up to five sessions, each arena would hold its own memory
        options.enable_cpu_mem_arena = False
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return options

    def _open(self, providers: list[str]) -> ort.InferenceSession:
        return ort.InferenceSession(str(self.path), self._session_options(), providers=providers)

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        wanted = self.OUTPUTS
        if not all(isinstance(d, int) for name in wanted for d in shapes[name]):
            raise contract.ContractError(f"{self.path}: outputs {wanted} must have static shapes")
        return {name: shapes[name] for name in wanted}

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _run_or_fall_back(self, run):
        try:
            return run()
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            if self.provider == CPU:
                raise
            self._fall_back(exc)
            return run()

    def _fall_back(self, exc: Exception) -> None:
        """The accelerator failed: carry on with the CPU and the same components."""
        failed = self.provider
        self.fallback_reason = f"{failed} failed ({type(exc).__name__}: {str(exc)[:200]}); switched to the CPU"
        self.fallbacks += 1
        log.error("%s", self.fallback_reason)
        self.session = self._open([CPU])
        self.provider_reason = self.fallback_reason


class AdaptiveSession(OnnxSession):
    """step() runs one frame; the updated components become the next frame's inputs.

    `strength` is the adaptation strength in [0, 1] (the graph's `adapt` input): 0 runs the frame on the source
    statistics and leaves the components as they are (the unadapted model), 1 (or True) is
    full UnMix-TNS, values between blend the two and move the components that much less
    (agent/gate.py sets it). `update=False` adapts without moving the components (frozen).
    `measure=True` asks for this frame's shift whatever the session's cadence (the graph layout
    measures every frame; FoldedSession may not).
    """

    OUTPUTS = (contract.LOGITS, contract.FEATURES, contract.SHIFT)

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 seed: int = 0, info: ModelInfo | None = None):
        info = info or read_model_info(path)
        spec = info.adaptation
        # (layer, tensor, graph input, graph output) for every state tensor
        self._state_io = [(layer.name, t, contract.state_input(layer.name, t), contract.state_output(layer.name, t))
                          for layer in spec.layers for t in spec.state_tensors]
        self._adapt = np.zeros(1, np.float32)
        super().__init__(path, device=device, threads=threads, seed=seed, info=info)

    def _set_state(self, state: dict) -> None:
        self._current = {i: np.array(state[layer][t], np.float32, order="C") for layer, t, i, _ in self._state_io}
        self._spare = {i: np.empty_like(a) for i, a in self._current.items()}
        self._scratch = {i: np.empty_like(a) for i, a in self._current.items()}

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True, measure: bool = False) -> StepOutput:
        _check_strength(strength)
        self._adapt[0] = strength
        commit = strength > 0 and update
        target = self._spare if commit else self._scratch
        self._run_or_fall_back(lambda: self._run(image, target))
        if commit:
            self._current, self._spare = self._spare, self._current
            self.frames += 1
        out = self._outputs
        return StepOutput(out[contract.LOGITS][0].copy(), out[contract.FEATURES][0].copy(),
                          out[contract.SHIFT][0].copy())

    def _run(self, image: np.ndarray, target: dict) -> None:
        binding = self.session.io_binding()
        binding.bind_cpu_input(contract.IMAGE, np.ascontiguousarray(image, np.float32))
        binding.bind_cpu_input(contract.ADAPT, self._adapt)
        for _, _, name_in, name_out in self._state_io:
            binding.bind_cpu_input(name_in, self._current[name_in])
            _bind_output(binding, name_out, target[name_in])
        for name, array in self._outputs.items():
            _bind_output(binding, name, array)
        self.session.run_with_iobinding(binding)

    @property
    def state_feeds(self) -> dict[str, np.ndarray]:
        """The components as the next step's session inputs (copies)."""
        return {name: a.copy() for name, a in self._current.items()}

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        nested: dict[str, dict[str, np.ndarray]] = {}
        for layer, t, name_in, _ in self._state_io:
            nested.setdefault(layer, {})[t] = self._current[name_in].copy()
        return nested


LEARNERS = {"anchor": CameraAnchor, "unmix": RobustMixture}  # the folded layout's, by adaptation.method


@dataclass
class _Bake:
    """A session that normalises with constant statistics (agent/baked.py); None until built."""
    mean: np.ndarray
    var: np.ndarray
    session: ort.InferenceSession | None


class FoldedSession(OnnxSession):
    """The folded layout (exporters/folded.py): the graph normalises with `norm.mean/var` and returns
    the frame's statistics; the learner runs here, all layers in one vectorised numpy step.

    `learner`: `anchor` (agent/anchor.CameraAnchor, the default) or `unmix` (agent/unmix.RobustMixture).
    Unadapted frames run a session with the source statistics baked in (agent/baked.py); every
    `statistics_every`-th of them, and any the caller asks to (`measure`: the gate's shadow passes),
    runs a second source bake that keeps the statistics branch: the instance term, and for the
    anchor the camera's usual statistics (its reference). The anchor's adapted frames (a drift
    episode) all run the file's graph with its normalisation inputs and statistics output: followed
    in steps of several frames its correction oscillates (bench/camera.py).

    UnMix-TNS's adapted frames measure every `statistics_every`-th frame; the frames between run a bake
    of the components' statistics (with the last measured frame as the instance term). A measured
    frame runs the graph normalised with the components as they are (its answer), updates them (decayed
    for the frames the measurement stands for), and builds a new bake once the normalisation has moved
    more than `rebake_divergence` (mean per-layer KL) from the one in use; the next measured frame takes
    it up and reports the shift, so a camera that has settled costs no rebuilds. With
    `statistics_every` 1 every frame runs the graph. Components and checkpoints are the robust layout's.
    """

    OUTPUTS = (contract.LOGITS, contract.FEATURES, contract.STATS)
    BAKED_OUTPUTS = (contract.LOGITS, contract.FEATURES)

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, seed: int = 0,
                 info: ModelInfo | None = None, statistics_every: int = STATISTICS_EVERY,
                 rebake_divergence: float = REBAKE_DIVERGENCE, learner: str = "unmix"):
        if statistics_every < 1 or not rebake_divergence >= 0:
            raise ValueError(f"statistics_every must be >= 1 and rebake_divergence >= 0, got {statistics_every}, "
                             f"{rebake_divergence}")
        info = info or read_model_info(path)
        self.statistics_every, self.rebake_divergence = statistics_every, rebake_divergence
        if learner not in LEARNERS:
            raise ValueError(f"learner must be one of {', '.join(LEARNERS)}, got {learner!r}")
        self.learner = LEARNERS[learner](info.adaptation, info.source_stats)
        self._anchored = learner == "anchor"
        self._source: dict[bool, ort.InferenceSession] = {}  # the source bake, by whether it measures
        self.bakes = 0  # adapted bakes built
        super().__init__(path, device=device, threads=threads, seed=seed, info=info)
        # the network with constant normalisation, for the frames that measure nothing (None: every frame measures)
        self.baker = (BakedNormalisation(path, (self.learner.source_mean, self.learner.source_var),
                                          self._session_options, self.session.get_providers())
                       if statistics_every > 1 else None)

    def _set_state(self, state: dict) -> None:
        self.learner.set_state(state)
        self._last = None  # the last measured frame's statistics (a gate shadow's too), for the instance term
        self._normalised: tuple[float, tuple[np.ndarray, np.ndarray]] | None = None  # (strength, _normalisation)
        self._unmeasured = {False: 0, True: 0}  # unadapted / adapted frames since the last measured one
        self._bake: _Bake | None = None  # what adapted frames run; None: bake the components when needed
        self._pending: tuple[np.ndarray, _Bake | None] | None = None  # the last measurement's shift and new bake

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return self.learner.state()

    @property
    def last_statistics(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last measured frame's statistics (mean, variance of every adapted layer's input), if any."""
        return self._last

    @property
    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """What the next measured adapted frame (at full strength) is normalised with."""
        return self._normalisation(1.0)

    @property
    def baked_statistics(self) -> tuple[np.ndarray, np.ndarray] | None:
        """What the adapted frames between measurements are normalised with (their bake); None: no bake yet."""
        return None if self._bake is None else (self._bake.mean, self._bake.var)

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True, measure: bool = False) -> StepOutput:
        _check_strength(strength)
        adapted = strength > 0
        shift = None
        every = 1 if adapted and self._anchored else self.statistics_every
        if not (measure or self._unmeasured[adapted] + 1 >= every):
            self._unmeasured[adapted] += 1
            self._run_or_fall_back(lambda: self._run_baked(image, strength))
        elif adapted and self.baker is not None and not self._anchored:
            shift = self._run_or_fall_back(self._take_up)
            frames, self._unmeasured[True] = self._unmeasured[True] + 1, 0
            self._measure(image, strength, update, frames)
        else:
            frames = self._unmeasured[adapted] + 1
            shift = self._measured_now(image, strength, update, frames)
        if adapted:
            self.frames += update
        out = self._outputs
        return StepOutput(out[contract.LOGITS][0].copy(), out[contract.FEATURES][0].copy(), shift)

    def _normalisation(self, strength: float) -> tuple[np.ndarray, np.ndarray]:
        """Kept until the components or the instance term change: what a measurement moved to is what
        the next one normalises with."""
        m = self.learner
        if strength == 0:
            return m.source_mean, m.source_var
        if self._normalised is None or self._normalised[0] != strength:
            mean, var = m.statistics(*(self._last or (None, None)))
            self._normalised = (strength, (m.source_mean + strength * (mean - m.source_mean),
                                        m.source_var + strength * (var - m.source_var)))
        return self._normalised[1]

    def _update(self, stats: np.ndarray, strength: float, update: bool, frames: int) -> np.ndarray:
        mu, var_x = stats[0].copy(), stats[1].copy()
        if update:
            self.learner.update(mu, var_x, strength, frames=frames)
        self._last, self._normalised = (mu, var_x), None
        return self.learner.shift(mu, var_x)

    def _measure(self, image: np.ndarray, strength: float, update: bool, frames: int) -> None:
        """The graph's pass is the frame's answer and updates the components now; the shift and a rebuilt
        bake are taken up by the next measured frame."""
        mean, var = self._normalisation(strength)
        image = np.ascontiguousarray(image, np.float32)

        def measurement() -> tuple[np.ndarray, _Bake | None]:
            binding = self.session.io_binding()
            for name, value in ((contract.IMAGE, image), (contract.NORM_MEAN, mean), (contract.NORM_VAR, var)):
                binding.bind_cpu_input(name, value)
            for name, array in self._outputs.items():
                _bind_output(binding, name, array)
            self.session.run_with_iobinding(binding)
            shift = self._update(self._outputs[contract.STATS], strength, update, frames)
            moved_to = self._normalisation(strength)
            if self._bake is not None and self.learner.divergence(
                    *moved_to, self._bake.mean, self._bake.var).mean() <= self.rebake_divergence:
                return shift, None
            self.bakes += 1
            try:
                return shift, _Bake(*moved_to, self.baker.session(*moved_to))
            except Exception:  # onnxruntime's own types; the take-up builds it again where sessions run now
                return shift, _Bake(*moved_to, None)
        self._pending = self._run_or_fall_back(measurement)

    def _take_up(self) -> np.ndarray | None:
        """The last measurement's shift and bake."""
        if self._pending is None:
            return None
        shift, rebuilt = self._pending
        if rebuilt is not None:
            if rebuilt.session is None:
                rebuilt.session = self.baker.session(rebuilt.mean, rebuilt.var)
            self._bake = rebuilt
        self._pending = None
        return shift

    def _measured_now(self, image: np.ndarray, strength: float, update: bool, frames: int = 1) -> np.ndarray:
        """Unadapted frames (the gate's shadow passes) through a source bake that keeps `stats` (cheaper
        than the graph); they leave the components alone but become the instance term (bench.quality).
        An anchor's adapted frames, and without a baker (statistics every frame) every frame, the graph."""
        normalisation = self._normalisation(strength)
        self._run_or_fall_back(lambda: self._run_measuring(image, *normalisation, adapted=strength > 0))
        self._unmeasured[strength > 0] = 0
        stats = self._outputs[contract.STATS]
        if strength > 0:
            return self._update(stats, strength, update, frames=1)
        self._last, self._normalised = (stats[0].copy(), stats[1].copy()), None
        if update and isinstance(self.learner, CameraAnchor):  # the camera's usual conditions: its reference
            self.learner.update(*self._last, strength=0.0, frames=frames)
        return self.learner.shift(*self._last)

    def _run_measuring(self, image: np.ndarray, mean: np.ndarray, var: np.ndarray, adapted: bool = False) -> None:
        if self.baker is not None and not adapted:
            session = self._source_session(measuring=True)
            binding = session.io_binding()
        else:
            session, binding = self.session, self.session.io_binding()
            binding.bind_cpu_input(contract.NORM_MEAN, mean)
            binding.bind_cpu_input(contract.NORM_VAR, var)
        binding.bind_cpu_input(contract.IMAGE, np.ascontiguousarray(image, np.float32))
        for name, array in self._outputs.items():
            _bind_output(binding, name, array)
        session.run_with_iobinding(binding)

    def _source_session(self, measuring: bool) -> ort.InferenceSession:
        if measuring not in self._source:
            self._source[measuring] = self.baker.session(*self._normalisation(0.0), measuring=measuring)
        return self._source[measuring]

    def _run_baked(self, image: np.ndarray, strength: float) -> None:
        if strength == 0:
            session = self._source_session(measuring=False)
        else:
            if self._bake is None:
                self._bake = _Bake(*self._normalisation(strength), None)
                self._bake.session = self.baker.session(self._bake.mean, self._bake.var)
                self.bakes += 1
            session = self._bake.session
        binding = session.io_binding()
        binding.bind_cpu_input(contract.IMAGE, np.ascontiguousarray(image, np.float32))
        for name in self.BAKED_OUTPUTS:
            _bind_output(binding, name, self._outputs[name])
        session.run_with_iobinding(binding)

    def _fall_back(self, exc: Exception) -> None:
        """Bakes are rebuilt on the CPU with the statistics they had; a measurement that failed on the
        accelerator runs again (its update came after the pass that failed)."""
        super()._fall_back(exc)
        if self.baker is None:
            return
        self.baker.providers = [CPU]
        self._source = {}
        if self._bake is not None:
            self._bake.session = self.baker.session(self._bake.mean, self._bake.var)
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].session = None  # built for the accelerator: the take-up builds it again


def _bind_output(binding, name: str, array: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
