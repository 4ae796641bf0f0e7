"""Soak: the daemon replays the sample video in a loop at full speed for a long run, publishing to a
mosquitto it starts, with a subscriber on every topic, while its RSS is sampled from /proc.

    python -m bench.soak                 # 30 minutes (docs/operations.md)
    python -m bench.soak --minutes 2     # a quick look

The first minute is warm-up (allocator, onnxruntime arenas); growth is measured from there as a
least-squares slope over the samples, in MB per hour. Also reports the frames processed and the
daemon's own stats at the end (queue depth, spool), so bounded queues show as bounded.
Writes bench/results/soak.json and prints a summary line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from .provenance import commit, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import Mosquitto, Subscriber

    from agent.samples import render_sample_video
    from exporters.cli import main as export

    models = RESULTS / "models"
    models.mkdir(parents=True, exist_ok=True)
    model = models / "efficientnet_lite0.robust.onnx"
    if not model.exists():
        assert export(["efficientnet-lite0", "--out", str(model)]) == 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = tmp / "sample.mp4"
        render_sample_video(video)
        broker = Mosquitto(tmp).start()
        sub = Subscriber(broker.port, "tta/#")
        config = tmp / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "device_id": "soak", "log_level": "warning",
            "model": {"path": str(model), "device": "cpu"},
            "cameras": [{"name": "cam", "source": str(video), "replay": {"paced": False, "loop": True}}],
            "mqtt": {"host": "127.0.0.1", "port": broker.port}, "state": {"dir": str(tmp / "state")},
            "advanced": {"mqtt": {"stats_interval_s": 5}, "state": {"checkpoint_every_s": 60}}}))
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "wb"))
        started = time.monotonic()
        samples: list[tuple[float, float]] = []
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(args.interval)
                if proc.poll() is not None:
                    log = (tmp / "agent.log").read_text()[-3000:]
                    raise SystemExit(f"daemon exited with {proc.returncode}:\n{log}")
                samples.append((time.monotonic() - started, rss_mb(proc.pid)))
        finally:
            proc.terminate()
            proc.wait(30)
            stats = sub.payloads("stats")
            sub.stop()
            broker.stop()
    t, rss = np.array(samples).T
    warm = t >= min(60.0, t[-1] / 2)
    slope = float(np.polyfit(t[warm] / 3600, rss[warm], 1)[0]) if warm.sum() > 1 else 0.0
    last = stats[-1] if stats else {}
    camera = last.get("cameras", {}).get("cam", {})
    report = {"command": "python -m bench.soak " + " ".join(sys.argv[1:]), "machine": machine(), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "minutes": args.minutes, "samples": len(samples),
              "rss_mb_after_warmup": round(float(rss[warm][0]), 1),
              "rss_mb_end": round(float(rss[-1]), 1), "rss_mb_max": round(float(rss.max()), 1),
              "slope_mb_per_hour": round(slope, 2), "frames_processed": camera.get("frames_processed"),
              "fps": camera.get("fps"), "mqtt": last.get("mqtt"), "exit_code": proc.returncode}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"soak {args.minutes:g} min: RSS {report['rss_mb_after_warmup']} MB after warm-up -> "
          f"{report['rss_mb_end']} MB at the end (max {report['rss_mb_max']}, "
          f"slope {report['slope_mb_per_hour']} MB/h), "
          f"{report['frames_processed']} frames; mqtt {report['mqtt']}")


if __name__ == "__main__":
    main()
