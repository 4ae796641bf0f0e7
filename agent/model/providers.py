"""Provider choice and the accelerator fallback, in one place: one model file in an onnxruntime session on the
chosen providers, carried over to the CPU with its state when the accelerator fails mid-run, the reason kept
for status reports."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import contract
from ..contract import ModelInfo, read_model_info
from ..onnxruntime_quiet import ort
from ..vocabulary import DEVICES
from .adaptive import Checkpoints

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

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
        # no per-session arena: the folded layout keeps the graph and a bake, each arena would hold its own memory
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


def bind_output(binding, name: str, array: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
