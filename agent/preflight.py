"""Everything `run` needs, checked before running: `tta-agent validate-config` and the daemon's start.

Each problem is one line that starts with the config's key path, so the unit's ExecStartPre
refuses a config that would only fail later (and a start never dies on it with a traceback).
"""
from __future__ import annotations

import ssl
import sys
import tempfile
import time
from pathlib import Path

import cv2

from .config import Config, ConfigError, layout_problem, read_password
from .contract import ContractError, ModelInfo, read_model_info
from .exits import EXIT_CONFIG
from .model.sessions import resolve_method
from .sources import redact, source_kind, source_problem

PROBE_TIMEOUT_S = 10.0


def report(config_path: Path, problems: list[str]) -> int:
    """One `tta-agent: error:` line per problem on stderr; the exit code."""
    for problem in problems:
        print(f"tta-agent: error: {config_path}: {problem}", file=sys.stderr)
    return EXIT_CONFIG if problems else 0


def check(config: Config, probe: bool = False) -> tuple[ModelInfo | None, list[str]]:
    """(the model's contract if it loads, every problem found). With `probe`, each camera is opened too."""
    info, problems = check_model(config)
    try:
        read_password(config.mqtt)
    except ConfigError as exc:
        problems.append(str(exc))
    _tls(config, problems)
    _state_dir(config.state.dir, problems)
    for i, camera in enumerate(config.cameras):
        problem = source_problem(camera.source)
        if problem is None and probe:
            problem = probe_source(camera.source)
        if problem:
            problems.append(f"cameras.{i}.source: {problem}")
    return info, problems


def check_model(config: Config) -> tuple[ModelInfo | None, list[str]]:
    """(the model's contract if it loads, the problems that stop it from running under this config)."""
    problems: list[str] = []
    return _model(config, problems), problems


def _model(config: Config, problems: list[str]) -> ModelInfo | None:
    try:
        info = read_model_info(config.model.path)
    except ContractError as exc:
        problems.append(f"model.path: {exc}")
        return None
    from .onnxruntime_quiet import ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # loading is the check: no optimisation, thread pool or arena the daemon would carry as peak memory
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads, options.enable_cpu_mem_arena = 1, False
    try:  # the graph itself: a file whose metadata reads can still fail to build
        ort.InferenceSession(str(config.model.path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        problems.append(f"model.path: onnxruntime cannot load {config.model.path}: {str(exc).splitlines()[0]}")
        return None
    adaptation = config.advanced.adaptation
    try:
        method = resolve_method(adaptation.method, info)
    except ContractError as exc:
        problems.append(str(exc))
        return None
    if adaptation.gate.enabled and method == "unmix" and info.shift_reference is None:
        problems.append(f"advanced.adaptation.gate.enabled: {config.model.path} has no shift reference "
                        "(tta.shift_reference, written by tta-export); re-export the model or set "
                        "advanced.adaptation.gate.enabled: false")
    problem = layout_problem(config, info.adaptation.layout, config.model.path)
    if problem:
        problems.append(problem)
    return info


def _tls(config: Config, problems: list[str]) -> None:
    tls = config.mqtt.tls
    if tls is None:
        return
    unreadable = False
    for key in ("ca", "cert", "key"):
        path = getattr(tls, key)
        if path is not None and not _readable(path, f"mqtt.tls.{key}", problems):
            unreadable = True
    if unreadable:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if tls.ca:
            context.load_verify_locations(cafile=str(tls.ca))
    except ssl.SSLError as exc:
        problems.append(f"mqtt.tls.ca: {tls.ca} is not a PEM CA certificate ({exc.reason or exc})")
    try:
        if tls.cert:
            context.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        problems.append(f"mqtt.tls.cert: {tls.cert} and {tls.key} are not a matching PEM certificate and key "
                        f"({exc.reason or exc})")


def _readable(path: Path, key: str, problems: list[str]) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror}")
        return False


def _state_dir(folder: Path, problems: list[str]) -> None:
    """Create it if need be and write a file in it, as the daemon will."""
    try:
        (folder / "spool").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe."):
            pass
    except OSError as exc:
        problems.append(f"state.dir: cannot write in {folder}: {exc.strerror} (the service's user needs a "
                        "writable folder; systemd's StateDirectory= makes one)")


def probe_source(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Open the source and read one frame; why not, or None."""
    kind = source_kind(uri)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(timeout * 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC,
              int(timeout * 1000)]
    if kind == "index":
        capture = cv2.VideoCapture(int(uri), cv2.CAP_ANY, params)
    elif kind == "device":
        capture = cv2.VideoCapture(uri, cv2.CAP_V4L2, params)
    elif kind == "stream":
        capture = cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
    else:
        capture = cv2.VideoCapture(uri)
    started = time.monotonic()
    try:
        if not capture.isOpened():
            return f"{redact(uri)} cannot be opened"
        ok, _ = capture.read()
        if not ok:
            return f"{redact(uri)} opened but gave no frame within {time.monotonic() - started:.0f} s"
        return None
    finally:
        capture.release()
