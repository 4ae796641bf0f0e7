"""Opening a model file as the session its layout and the config ask for."""
from __future__ import annotations

from pathlib import Path

from .. import contract
from ..contract import ModelInfo, read_model_info
from ..vocabulary import BACKENDS
from .cadence import STATISTICS_EVERY
from .folded_session import FoldedSession
from .graph_session import GraphSession
from .providers import CPU, choose_providers

SESSIONS = {session.LAYOUT: session for session in (GraphSession, FoldedSession)}  # by tta.adaptation.layout


def open_session(path: str | Path, device: str = "auto", backend: str = "auto", threads: int | None = None,
                 seed: int = 0, info: ModelInfo | None = None, statistics_every: int = STATISTICS_EVERY,
                 rebake_divergence: float | None = None, method: str = "auto"):
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
    return SESSIONS[info.adaptation.layout].open(path, info, resolve_method(method, info), statistics_every,
                                                 rebake_divergence, device=device, threads=threads, seed=seed)


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
    """`auto`: the layout's first method (folded: the camera anchor; graph: UnMix-TNS in the graph)."""
    methods = SESSIONS[info.adaptation.layout].METHODS
    if method == "auto":
        return methods[0]
    if method in methods:
        return method
    layouts = [layout for layout, session in SESSIONS.items() if method in session.METHODS]
    if not layouts:
        known = sorted({m for session in SESSIONS.values() for m in session.METHODS})
        raise ValueError(f"adaptation method must be auto or one of {', '.join(known)}, got {method!r}")
    raise contract.ContractError(f"advanced.adaptation.method: {method} needs a {layouts[0]}-layout model and "
                                 f"{info.path} has the {info.adaptation.layout} layout (tta-export --layout "
                                 f"{layouts[0]}, or method: auto)")
