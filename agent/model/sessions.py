"""Opening a model file as the session its layout and the config ask for."""
from __future__ import annotations

from pathlib import Path

from .. import contract
from ..config import BACKENDS
from ..contract import ModelInfo, read_model_info
from .cadence import STATISTICS_EVERY
from .folded_session import LEARNERS, FoldedSession
from .graph_session import GraphSession
from .providers import CPU, choose_providers


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
    learner = resolve_method(method, info)
    if info.adaptation.layout == "folded":
        return FoldedSession(path, device=device, threads=threads, seed=seed, info=info,
                             statistics_every=statistics_every, rebake_divergence=rebake_divergence,
                             learner=learner)
    return GraphSession(path, device=device, threads=threads, seed=seed, info=info)


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
