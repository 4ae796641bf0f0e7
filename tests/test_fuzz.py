"""Hostile and broken input, fuzzed with hypothesis: config files, MQTT command payloads, model
files, labels sidecars and state files. Each must give its own clear error (ConfigError,
ValueError, ContractError, LabelsError, StateError) or a valid result; any other exception is a
crash of the daemon or the CLI. TTA_FUZZ_EXAMPLES sets the cases per target (default 10 000;
derandomized, so CI runs the same cases every time)."""
from __future__ import annotations

import copy
import io
import json
import os
import queue
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config, ConfigError, MqttConfig, load_config
from agent.contract import ContractError, read_model_info
from agent.mqtt import MqttLink
from agent.replay import LabelsError, read_labels
from agent.spool import Spool
from agent.state import StateError, initial_state, load_state, save_state

EXAMPLES = int(os.environ.get("TTA_FUZZ_EXAMPLES", "10000"))
pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SCRATCH = Path(tempfile.mkdtemp(prefix="tta-fuzz-"))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=40), st.just("x" * 10_000))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)

VALID = {
    "model": {"path": "model.onnx", "device": "cpu"},
    "adaptation": {"mode": "on"},
    "lame": {"mode": "auto"},
    "cameras": [{"name": "cam1", "source": "rtsp://camera/stream"}],
    "mqtt": {"host": "broker", "port": 8883, "tls": {"ca": "ca.crt"}, "username": "u", "password_file": "p"},
    "state": {"dir": "state"},
    "advanced": {"model": {"threads": 2}, "adaptation": {"raw_every": 30, "gate": {"low": 0.5, "high": 1.5}},
                 "lame": {"window": 16}, "drift": {"warmup": 100}, "sources": {"stall_timeout_s": 5}},
}


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(VALID) if p]


@st.composite
def mutated_configs(draw) -> str:
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "delete", "unknown"]))
            if action == "replace":
                parent[path[-1]] = draw(values)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped this path
    return yaml.safe_dump(doc, allow_unicode=True)


def _bomb(depth: int, width: int) -> str:
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


config_texts = st.one_of(
    mutated_configs(), st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.builds(_bomb, st.integers(2, 12), st.integers(2, 10)),
    st.builds(lambda n: "cameras:\n" + "  - name: c\n    source: x\n" * n, st.integers(0, 70)),
)


@FUZZ
@given(config_texts)
def test_config_files_give_a_config_or_a_config_error(text):
    path = SCRATCH / "agent.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as exc:
        # the file's name, then one problem per line, each led by its key path (or the file, for unreadable text)
        lines = str(exc).splitlines()
        assert lines and lines[0].startswith(str(path)), lines
        assert all(re.match(r"^\S.*: \S", line) for line in lines[1:]), lines


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    spool = Spool(tmp_path_factory.mktemp("spool"))
    return MqttLink(MqttConfig(prefix="tta"), "box", ["cam1", "cam-2"], spool, queue.Queue())


topics = st.one_of(
    st.builds(lambda cam, kind, tail: f"tta/box/{cam}/{kind}/{tail}", st.sampled_from(["cam1", "cam-2", "x", ""]),
              st.sampled_from(["adaptation", "lame", "drift", ""]), st.sampled_from(["set", "get", "set/x"])),
    st.text(max_size=80))
payloads = st.one_of(
    st.binary(max_size=300), st.text(max_size=100).map(str.encode),
    st.sampled_from([b"on", b"OFF ", b"frozen", b"reset", b"auto", b"\xff\xfe", b'{"mode": "on"}']),
    st.integers(1, 20_000).map(lambda n: b"o" * n),
    values.map(lambda v: json.dumps(v, default=str).encode()))


@FUZZ
@given(topics, payloads)
def test_command_payloads_give_a_command_or_a_counted_rejection(link, topic, payload):
    try:
        command = link.parse_command(topic, payload)
    except ValueError as exc:
        assert str(exc)
        return
    assert command.camera in {"cam1", "cam-2"} and command.kind in {"adaptation", "lame"}


@pytest.fixture(scope="module")
def tiny_model() -> bytes:
    """A small adaptive model from the real exporter (torch for building it only)."""
    from tiny_models import with_batchnorm

    from agent.contract import Preprocess
    from exporters.export import adaptation_spec, build_adaptive

    model = with_batchnorm().eval()
    preprocess = Preprocess((16, 16), "RGB", (0, 0, 0), (1, 1, 1))
    onnx_model = build_adaptive(model, (1, 3, 16, 16), adaptation_spec(model), ["a", "b", "c"], preprocess)
    return onnx_model.SerializeToString()


@st.composite
def damaged_models(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "metadata", "io"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        buffer = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buffer[draw(st.integers(0, len(buffer) - 1))] = draw(st.integers(0, 255))
        return bytes(buffer)
    model = onnx.load_from_string(data)
    if kind == "metadata":
        prop = draw(st.sampled_from(list(model.metadata_props)))
        prop.value = draw(st.one_of(st.text(max_size=60), values.map(lambda v: json.dumps(v, default=str))))
    else:
        field = draw(st.sampled_from([model.graph.input, model.graph.output]))
        del field[draw(st.integers(0, len(field) - 1))]
    return model.SerializeToString()


@FUZZ
@given(st.data())
def test_damaged_model_files_give_a_contract_error_naming_the_file(tiny_model, data):
    path = SCRATCH / "model.onnx"
    path.write_bytes(data.draw(damaged_models(tiny_model)))
    try:
        read_model_info(path)
    except ContractError as exc:
        assert str(path) in str(exc)


CLASSES = ("cat", "dog", "T-shirt/top")
label_cells = st.one_of(st.sampled_from(CLASSES + ("cat|dog", "", "|", "bird")), st.text(max_size=12))
label_rows = st.lists(st.tuples(st.one_of(st.integers(-5, 10**12).map(str), st.text(max_size=6)), label_cells,
                                st.text(max_size=8)), max_size=8)
label_files = st.one_of(
    label_rows.map(lambda rows: "frame,label,condition\n" + "".join(f"{f},{lab},{c}\n" for f, lab, c in rows)),
    st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(label_files, st.booleans())
def test_labels_sidecars_give_labels_or_a_labels_error(text, as_bytes):
    path = SCRATCH / "labels.csv"
    if as_bytes:
        path.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        labels = read_labels(path, CLASSES)
    except LabelsError as exc:
        assert str(exc)
        return
    assert all(label.accepted <= {0, 1, 2} for label in labels.values())


@pytest.fixture(scope="module")
def state_file(tiny_model):
    path = SCRATCH / "valid.state.npz"
    info = read_model_info(_write(SCRATCH / "tiny.onnx", tiny_model))
    save_state(path, initial_state(info.adaptation, info.source_stats, 0), info.adaptation, frames=3)
    return path.read_bytes(), info.adaptation


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@FUZZ
@given(st.data())
def test_damaged_state_files_give_a_state_error(state_file, data):
    raw, spec = state_file
    kind = data.draw(st.sampled_from(["truncate", "flip", "replace"]))
    if kind == "truncate":
        damaged = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        buffer = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            buffer[data.draw(st.integers(0, len(buffer) - 1))] = data.draw(st.integers(0, 255))
        damaged = bytes(buffer)
    else:
        arrays = dict(np.load(io.BytesIO(raw)))
        key = data.draw(st.sampled_from(sorted(arrays)))
        arrays[key] = data.draw(st.sampled_from([np.zeros(3), np.full((16, 8), np.nan), np.array("junk"),
                                                 np.zeros((16, 8), np.int64)]))
        out = io.BytesIO()
        np.savez(out, **arrays)
        damaged = out.getvalue()
    path = _write(SCRATCH / "damaged.state.npz", damaged)
    try:
        state, _ = load_state(path, spec)
    except StateError as exc:
        assert str(path) in str(exc)
        return
    assert all(np.all(np.isfinite(t)) for layer in state.values() for t in layer.values())
