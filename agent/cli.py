"""tta-agent: the daemon, replay of recorded video, config validation, the demo and the service unit.

This module imports nothing heavy at the top: `run` takes up SIGHUP and SIGTERM before numpy, onnxruntime
or the config schema are loaded, so a reload or stop sent while the daemon starts is never fatal.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from pathlib import Path

from .exits import EXIT_CONFIG, EXIT_DAMAGED_INPUT, EXIT_FAILURE
from .vocabulary import DEVICES

log = logging.getLogger("tta-agent")


def operator_errors() -> tuple[type[Exception], ...]:
    """What a user can fix (a config, a file named, a model, a source): one line and EXIT_CONFIG."""
    from .config import ConfigError
    from .contract import ContractError
    from .files import FolderInUse
    from .replay import LabelsError
    from .sources import SourceError
    from .state import StateError

    return ConfigError, ContractError, FolderInUse, LabelsError, SourceError, StateError


def replay_config(args):
    """What the daemon would run on this video: the --config file (or the defaults around --model) with the
    --device, --threads and --set overrides."""
    from .config import ConfigError, apply_overrides, load_config, parse_config, parse_overrides

    if args.config is None and args.model is None:
        raise ConfigError("replay needs --model or --config")
    flags = {"model.path": args.model and str(args.model.resolve()), "model.device": args.device,
             "advanced.model.threads": args.threads}
    overrides = {**{k: v for k, v in flags.items() if v is not None}, **parse_overrides(args.set)}
    if args.config:
        return load_config(args.config, overrides)
    doc = {"model": {}, "cameras": [{"name": "replay", "source": str(args.video)}]}
    return parse_config(apply_overrides(doc, overrides), Path.cwd())


def cmd_replay(args) -> int:
    from .pipeline import build_pipeline, open_camera_session
    from .replay import format_table, plot_report, read_labels, replay, write_json
    from .sources import FileSource

    config = replay_config(args)
    session = open_camera_session(config)
    if args.state:
        session.load(args.state)
    labels = read_labels(args.labels, session.info.labels) if args.labels else None
    pipeline = build_pipeline(config, session)
    if labels:
        pipeline.score_unadapted = True  # the unadapted model on every frame, to score it: nothing else changes
    source = FileSource(args.video, paced=args.paced, loop=False, start=args.start, end=args.end)
    summary, record = replay(pipeline, source, labels, progress=not args.quiet and sys.stderr.isatty())
    print(format_table(summary))
    report_path = args.report or Path(args.video).with_suffix(".report.png")
    if plot_report(record, summary, report_path):
        print(f"report: {report_path}")
    if args.json:
        write_json(summary, args.json)
    if args.save_state:
        session.save(args.save_state)
    return EXIT_DAMAGED_INPUT if summary["truncated"] else 0


def cmd_validate(args) -> int:
    from .config import load_config
    from .preflight import check, report

    config = load_config(args.config)
    info, problems = check(config, probe=args.probe)
    if problems:
        return report(args.config, problems)
    probed = ", every camera opened" if args.probe else ""
    print(f"{args.config}: valid ({len(config.cameras)} camera(s), model {config.model.path.name} with "
          f"{len(info.labels)} classes{probed})")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoError, run_demo

    try:
        return run_demo(args.config, resume=args.resume)
    except DemoError as exc:
        print(f"tta-agent: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_unit(args) -> int:
    from .unit import write_unit

    path = write_unit(args.config, args.output)
    print(f"{path}: runs {Path(sys.executable).with_name('tta-agent')} on {args.config}; then: systemctl "
          f"daemon-reload && systemctl enable --now {path.stem}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-agent", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("replay", help="run a recorded video through the agent and report")
    r.add_argument("video", type=Path)
    r.add_argument("--config", type=Path, help="run as the daemon would under this config (its model, adaptation, "
                                               "LAME and drift sections); without it, the defaults")
    r.add_argument("--model", type=Path, help="adaptive .onnx from tta-export (with --config: overrides model.path)")
    r.add_argument("--labels", type=Path, help="CSV sidecar: frame,label[,condition]")
    r.add_argument("--device", choices=DEVICES, help="overrides model.device (default: auto)")
    r.add_argument("--threads", type=int, help="overrides advanced.model.threads (default: physical cores)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set adaptation.mode=off --set lame.mode=on (the value "
                        "is read as YAML; docs/configuration.md lists the keys)")
    r.add_argument("--paced", action="store_true", help="at the video's own frame rate, not as fast as possible")
    r.add_argument("--start", type=int, default=0, help="first frame")
    r.add_argument("--end", type=int, help="stop before this frame")
    r.add_argument("--state", type=Path, help="start from these components (.npz)")
    r.add_argument("--save-state", type=Path, help="write the final components (.npz)")
    r.add_argument("--report", type=Path, help="PNG report (default: <video>.report.png)")
    r.add_argument("--json", type=Path, help="write the summary as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress bar and no INFO lines: the table and errors")
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser("run", help="run the daemon")
    d.add_argument("--config", type=Path, required=True)

    v = sub.add_parser("validate-config", help="check a config file (for ExecStartPre)")
    v.add_argument("config", type=Path)
    v.add_argument("--probe", action="store_true", help="also open every camera and read a frame")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("demo", help="the sample video through the agent with a live MQTT view")
    m.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    m.add_argument("--resume", action="store_true", help="go on from the last demo's adaptation and drift state "
                                                         "(default: each run starts clean)")
    m.set_defaults(func=cmd_demo)

    u = sub.add_parser("install-unit", help="write the systemd unit for this installation (its ExecStart runs "
                                            "the tta-agent of the environment this command runs from)")
    u.add_argument("--config", type=Path, default=Path("/etc/tta-agent/agent.yaml"),
                   help="the config the service runs (default: /etc/tta-agent/agent.yaml)")
    u.add_argument("--output", type=Path, default=Path("/etc/systemd/system/tta-agent.service"),
                   help="where to write the unit (default: /etc/systemd/system/tta-agent.service)")
    u.set_defaults(func=cmd_unit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        return run(args.config)
    try:
        return args.func(args)
    except Exception as exc:
        return _refused(exc)


def run(config: Path) -> int:
    """The daemon. Signals are taken up before anything heavy is imported, then handed to the loop."""
    from .flag import SignalFlag

    stop, reload = SignalFlag(), SignalFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    signal.signal(signal.SIGHUP, reload.set)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1`: every thread's stack to the log, for a daemon that hangs
    try:
        from .daemon import run_daemon

        return run_daemon(config, stop, reload)
    except Exception as exc:
        return _refused(exc)


def _refused(exc: Exception) -> int:
    """An error that escaped a command: one line and EXIT_CONFIG when the user can fix it, else the
    traceback and EXIT_FAILURE."""
    if isinstance(exc, operator_errors()):
        for line in str(exc).splitlines():
            print(f"tta-agent: error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(exc, OSError) and exc.filename:  # a file named on the command line: missing, unreadable
        print(f"tta-agent: error: {exc.filename}: {exc.strerror or exc}; check the path and its permissions",
              file=sys.stderr)
        return EXIT_CONFIG
    log.critical("failed: %s: %s (exit %d; please report this with the traceback below)", type(exc).__name__, exc,
                 EXIT_FAILURE, exc_info=exc)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
