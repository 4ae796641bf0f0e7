"""tta-agent: the daemon, replay of recorded video, config validation and the demo."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import DEVICES, Config, ConfigError, apply_overrides, load_config, parse_config, parse_overrides
from .contract import ContractError
from .pipeline import build_pipeline, open_camera_session
from .preflight import EXIT_CONFIG, check, report
from .replay import LabelsError, format_table, plot_report, read_labels, replay, write_json
from .sources import FileSource, SourceError
from .state import StateError

log = logging.getLogger("tta-agent")
EXIT_DAMAGED_INPUT = 3  # replay ran to the end of what could be decoded, but the video is cut or corrupt


def replay_config(args) -> Config:
    """What the daemon would run on this video: the --config file (or the defaults around --model) with the
    --device, --threads and --set overrides."""
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
    config = replay_config(args)
    session = open_camera_session(config)
    if args.state:
        session.load(args.state)
    labels = read_labels(args.labels, session.info.labels) if args.labels else None
    pipeline = build_pipeline(config, session)
    if labels:
        pipeline.raw_every = 1  # the unadapted model on every frame, to score it
    source = FileSource(args.video, paced=args.paced, loop=False, start=args.start, end=args.end)
    summary, record = replay(pipeline, source, labels, progress=not args.quiet)
    print(format_table(summary))
    report_path = args.report or Path(args.video).with_suffix(".report.png")
    if plot_report(record, summary, report_path):
        print(f"report: {report_path}")
    if args.json:
        write_json(summary, args.json)
    if args.save_state:
        session.save(args.save_state)
    return EXIT_DAMAGED_INPUT if summary["truncated"] else 0


def cmd_run(args) -> int:
    from .daemon import run_daemon

    return run_daemon(args.config)


def cmd_validate(args) -> int:
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
        return run_demo(args.config)
    except DemoError as exc:
        print(f"tta-agent: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-agent", description=__doc__)
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
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser("run", help="run the daemon")
    d.add_argument("--config", type=Path, required=True)
    d.set_defaults(func=cmd_run)

    v = sub.add_parser("validate-config", help="check a config file (for ExecStartPre)")
    v.add_argument("config", type=Path)
    v.add_argument("--probe", action="store_true", help="also open every camera and read a frame")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("demo", help="the sample video through the agent with a live MQTT view")
    m.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ContractError, LabelsError, SourceError, StateError, ValueError) as exc:
        print(f"tta-agent: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # a file named on the command line: missing, unreadable, a folder not writable
        print(f"tta-agent: error: {exc.filename or ''}: {exc.strerror or exc}; check the path and its "
              "permissions", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
