"""The systemd unit (systemd-analyze) and the config schema: errors name the key path."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.cli import main as agent_main
from agent.config import ConfigError, load_config, parse_config
from agent.contract import ContractError

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "tta-agent.service"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_install_unit_writes_a_unit_for_this_environment_that_verifies_and_is_hardened(tmp_path):
    """`tta-agent install-unit`, as the operator runs it from the venv the service will use."""
    config = tmp_path / "agent.yaml"
    unit = tmp_path / "units" / "tta-agent.service"
    made = subprocess.run([str(Path(sys.executable).with_name("tta-agent")), "install-unit", "--config", str(config),
                           "--output", str(unit)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    text = unit.read_text()
    script = Path(sys.executable).with_name("tta-agent")
    assert f"ExecStart={script} run --config {config}\n" in text
    assert f"ExecStartPre={script} validate-config {config}\n" in text and "/opt/tta-agent" not in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                              text=True)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert exposure <= 2.0, security.stdout[-2000:]
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=", "ExecStartPre=",
                 "DynamicUser=yes", "StateDirectory=tta-agent", "DeviceAllow=char-video4linux",
                 "ProtectSystem=strict", "LoadCredentialEncrypted=mqtt-password"):
        assert line in text


@pytest.mark.parametrize("example", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(example):
    config = load_config(example)
    assert config.cameras


def _base(**changes) -> dict:
    doc = {"model": {"path": "m.onnx"}, "cameras": [{"name": "front", "source": "0"}]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, message", [
    (_base(modle={"path": "x"}), "modle: unknown key; did you mean model?"),
    (_base(model={"path": "m.onnx", "device": "tpu"}), "model.device: must be one of auto, cpu, cuda (got 'tpu')"),
    (_base(advanced={"model": {"threads": 0}}), "advanced.model.threads: must be at least 1 (got 0)"),
    (_base(model={"path": "m.onnx", "threads": 2}),
     "model.threads: unknown key; this key is set under advanced: as advanced.model.threads"),
    (_base(adaptation={"method": "anchor"}),
     "adaptation.method: unknown key; this key is set under advanced: as advanced.adaptation.method"),
    (_base(drift={"warmup": 10}), "drift: unknown key; this key is set under advanced: as advanced.drift"),
    (_base(advanced={"lame": {"mode": "on"}}), "advanced.lame.mode: unknown key; this key is set at the top level: "
                                                "lame.mode"),
    (_base(cameras=[{"name": "front door", "source": "0"}]),
     "cameras.0.name: must be 1 to 64 letters, digits, _ and - (got 'front door')"),
    (_base(cameras=[]), "cameras: needs at least 1 item(s)"),
    (_base(advanced={"drift": {"warmup": "soon"}}), "advanced.drift.warmup: must be a whole number (got 'soon')"),
    (_base(mqtt={"port": 70000}), "mqtt.port: must be at most 65535 (got 70000)"),
    (_base(mqtt={"password_file": "a", "password_env": "B"}), "mqtt: give one password source"),
    (_base(advanced={"lame": {"window": 10**12}}), "advanced.lame.window: must be at most 1024"),
    (_base(advanced={"adaptation": {"folded": {"statistics_every": 0}}}),
     "advanced.adaptation.folded.statistics_every: must be at least 1 (got 0)"),
    (_base(advanced={"adaptation": {"gate": {"low": 2, "high": 1}}}),
     "advanced.adaptation.gate: high (1.0) must be above low (2.0)"),
    ({"cameras": [{"name": "a", "source": "0"}]}, "model: required key missing"),
    ([1, 2], "(top level): expected a mapping"),
])
def test_bad_config_names_the_key_path_in_words(doc, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    assert any(problem.startswith(message) for problem in exc.value.problems), exc.value.problems
    assert not any(jargon in str(exc.value) for jargon in ("Input should", "String should", "Value error", "^["))


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path, capsys):
    """An appended `mqtt:` section would drop the first one's host, user and TLS without a word."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m.onnx}\ncameras: [{name: a, source: '0'}]\nmqtt:\n  host: broker.lan\n"
                    "  username: box\n  tls: {ca: ca.crt}\nmqtt:\n  port: 1884\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [f"{path}: mqtt: written twice (lines 3 and 7); YAML would keep only the second: "
                                  "merge them into one"]
    assert agent_main(["validate-config", str(path)]) == 2
    assert capsys.readouterr().err == f"tta-agent: error: {exc.value.problems[0]}\n"
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: {path: m.onnx, device: cpu, device: cuda}\ncameras: [{name: a, source: '0'}]\n")
    with pytest.raises(ConfigError, match=r"model.device: written twice \(lines 1 and 1\)"):
        load_config(nested)


def test_every_config_error_is_one_line_of_its_own(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base(model={"path": "m.onnx", "device": "tpu"}, modle=1,
                                         advanced={"model": {"threads": 0}})))
    assert agent_main(["validate-config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"tta-agent: error: {path}: ") for line in lines), lines


def test_yaml_on_off_are_read_as_the_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m.onnx}\ncameras: [{name: a, source: '0'}]\nadaptation: {mode: off}\n"
                    "lame: {mode: on}\n")
    config = load_config(path)
    assert (config.adaptation.mode, config.lame.mode) == ("off", "on")


def test_yaml_bomb_and_garbage_are_refused(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\nd: [*c,*c]\n')
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        load_config(bomb)
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"\xff\xfe\x00garbage")
    assert agent_main(["validate-config", str(junk)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_validate_config_reports_missing_files(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert agent_main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"model.path: model file {tmp_path / 'm.onnx'} does not exist" in err


def test_the_configuration_reference_is_the_schema_and_the_example_shows_the_user_keys():
    """docs/configuration.md is generated from the schema; configs/camera.yaml sets only keys a user sets."""
    from agent.config_reference import markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == markdown(), \
        "regenerate it: python -m agent.config_reference > docs/configuration.md"
    example = (ROOT / "configs" / "camera.yaml").read_text()
    assert "advanced" not in yaml.safe_load(example) and len(example.splitlines()) <= 35


def test_layout_keys_are_refused_for_a_model_of_the_other_layout(fmnist, tmp_path):
    """advanced.adaptation.folded applies to folded-layout models: a graph-layout one refuses it at start."""
    from agent.pipeline import build_pipeline
    from agent.preflight import check

    doc = _base(model={"path": str(fmnist["int8"])}, state={"dir": str(tmp_path)},
                advanced={"adaptation": {"folded": {"statistics_every": 4}}})
    config = parse_config(doc)
    _, problems = check(config)
    assert any(p.startswith("advanced.adaptation.folded: these keys apply to folded-layout models") for p in problems)
    with pytest.raises(ContractError, match="advanced.adaptation.folded"):
        build_pipeline(config)
