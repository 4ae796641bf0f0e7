"""`tta-agent install-unit`: the shipped systemd unit, pointed at this installation.

The unit in `systemd/tta-agent.service` names `/opt/tta-agent/.venv/bin/tta-agent` and
`/etc/tta-agent/agent.yaml`; an agent installed anywhere else needs those two paths changed, and
`systemd-analyze verify` (and the service) fails until they are. This writes the unit with the
`tta-agent` of the environment the command runs from and the config given.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .config import ConfigError
from .files import write_atomic

SHIPPED = Path(__file__).resolve().parents[1] / "systemd" / "tta-agent.service"
SHIPPED_AGENT = "/opt/tta-agent/.venv/bin/tta-agent"
SHIPPED_CONFIG = "/etc/tta-agent/agent.yaml"
SHIPPED_DOCS = "file:///opt/tta-agent/README.md"


def unit_text(config: Path, agent: Path | None = None) -> str:
    """The shipped unit with ExecStart/ExecStartPre running `agent` (default: this environment's) on `config`."""
    agent = agent or Path(sys.executable).with_name("tta-agent")
    if not SHIPPED.is_file():
        raise ConfigError(f"install-unit: {SHIPPED} is missing; run it from an installation of the source "
                          "checkout (pip install -e .)")
    if not agent.is_file():
        raise ConfigError(f"install-unit: {agent} does not exist; run install-unit with the tta-agent of the "
                          "environment the service should run (e.g. /opt/tta-agent/.venv/bin/tta-agent install-unit)")
    config = config if config.is_absolute() else config.resolve()
    readme = SHIPPED.parents[1] / "README.md"
    body = SHIPPED.read_text()
    body = body[body.index("[Unit]"):]  # the shipped file's install notes are for the shipped paths
    header = (f"# tta-agent as a hardened systemd service, written by `tta-agent install-unit`:\n"
              f"# {agent} on {config}\n")
    return header + (body.replace(SHIPPED_AGENT, str(agent)).replace(SHIPPED_CONFIG, str(config))
                     .replace(SHIPPED_DOCS, readme.as_uri()))


def write_unit(config: Path, output: Path) -> Path:
    text = unit_text(config)
    for path in (Path(sys.executable).parent, config):
        if str(path).startswith(("/root", "/home")):
            print(f"tta-agent: warning: {path} is under /root or /home, which the service's user cannot read "
                  "(DynamicUser=, ProtectHome=); install under /opt and keep the config in /etc/tta-agent",
                  file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(output, lambda f: f.write(text.encode()))
