"""tta-agent: the daemon, replay of recorded video, config validation and the demo."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config, parse_config
from .contract import ContractError
from .pipeline import LAME_MODES, build_pipeline, open_camera_session
from .preflight import EXIT_CONFIG, check, report
from .replay import LabelsError, format_table, plot_report, read_labels, replay, write_json
from .runtime import BACKENDS, DEVICES, REBAKE_DIVERGENCE, STATISTICS_EVERY
from .sources import FileSource, SourceError
from .state import StateError

log = logging.getLogger("tta-agent")
EXIT_DAMAGED_INPUT = 3  # replay ran to the end of what could be decoded, but the video is cut or corrupt


def replay_config(args) -> Config:
    """What the daemon would run on this video: the --config file's sections, or one made from the flags."""
    if args.config:
        config = load_config(args.config)
        model = config.model.model_copy(update={"path": args.model}) if args.model else config.model
        return config.model_copy(update={"model": model})
    if args.model is None:
        raise ConfigError("replay needs --model or --config")
    return parse_config({
        "model": {"path": str(args.model), "device": args.device, "backend": args.backend, "threads": args.threads},
        "adaptation": {"mode": args.adaptation, "seed": args.seed, "raw_every": args.raw_every,
                       "statistics_every": args.statistics_every, "rebake_divergence": args.rebake_divergence,
                       "measure_on_worker": args.measure_on_worker,
                       "statistics_every_max": args.statistics_every_max,
                       "gate": {"enabled": args.gate == "on"}, "guard": {"enabled": args.guard == "on"}},
        "lame": {"mode": args.lame, "window": args.window, "affinity": args.affinity, "knn": args.knn},
        "drift": {"warmup": args.drift_warmup},
        "cameras": [{"name": "replay", "source": str(args.video)}],
    })


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
    from .demo import run_demo

    return run_demo(args.config)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-agent", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("replay", help="run a recorded video through the agent and report")
    r.add_argument("video", type=Path)
    r.add_argument("--config", type=Path, help="run as the daemon would under this config (its model, adaptation, "
                                               "LAME and drift sections; the flags below are then ignored)")
    r.add_argument("--model", type=Path, help="adaptive .onnx from tta-export (with --config: overrides model.path)")
    r.add_argument("--labels", type=Path, help="CSV sidecar: frame,label[,condition]")
    r.add_argument("--device", choices=DEVICES, default="auto")
    r.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: onnxruntime, or torch when --device cuda and only torch reaches the GPU")
    r.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's choice)")
    r.add_argument("--paced", action="store_true", help="at the video's own frame rate, not as fast as possible")
    r.add_argument("--start", type=int, default=0, help="first frame")
    r.add_argument("--end", type=int, help="stop before this frame")
    r.add_argument("--adaptation", choices=("on", "frozen", "off"), default="on")
    r.add_argument("--gate", choices=("on", "off"), default="on",
                   help="adapt only as far as frames leave the model's clean shift reference (off: always fully)")
    r.add_argument("--guard", choices=("on", "off"), default="on",
                   help="reset and pause adaptation when its predictions collapse onto few classes")
    r.add_argument("--lame", choices=LAME_MODES, default="auto")
    r.add_argument("--window", type=int, default=16, help="LAME window, frames")
    r.add_argument("--affinity", choices=("knn", "rbf"), default="knn")
    r.add_argument("--knn", type=int, default=3)
    r.add_argument("--raw-every", type=int, default=30, help="also run the unadapted model every N frames (0: never)")
    r.add_argument("--statistics-every", type=int, default=STATISTICS_EVERY,
                   help="folded-layout models: measure statistics every N frames")
    r.add_argument("--rebake-divergence", type=float, default=REBAKE_DIVERGENCE,
                   help="folded-layout models: rebuild the baked normalisation once the statistics are this far "
                        "from it (mean KL per layer)")
    r.add_argument("--measure-on-worker", action="store_true",
                   help="folded-layout models: measure statistics on a worker thread")
    r.add_argument("--statistics-every-max", type=int, metavar="N",
                   help="folded-layout models: the faster mode; measure adapted frames down to every N-th "
                        "while the measurements rebuild nothing")
    r.add_argument("--drift-warmup", type=int, default=100,
                   help="frames that learn the camera's usual imaging statistics")
    r.add_argument("--seed", type=int, default=0)
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
