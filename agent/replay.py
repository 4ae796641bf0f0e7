"""Replay a recorded video through the agent: progress, a summary table and a PNG report.

With a labels sidecar (CSV: frame,label[,condition]; a label may list accepted classes
separated by '|') the summary compares accuracy of the unadapted model, the adapted
model before LAME, and the agent's answer (LAME-corrected where LAME was applied).
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .drift import DriftEvent
from .pipeline import CameraPipeline, FrameResult
from .sources import FileSource

log = logging.getLogger(__name__)


class LabelsError(ValueError):
    """A labels sidecar row that cannot be used; the message names the file and row."""


@dataclass
class FrameLabel:
    accepted: frozenset[int]
    condition: str = ""


def read_labels(path: str | Path, class_names: tuple[str, ...]) -> dict[int, FrameLabel]:
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist")
    index = {name: i for i, name in enumerate(class_names)}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return _parse_labels(path, csv.DictReader(f), index)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"labels file {path} is not UTF-8 CSV: {exc}") from None
    except OSError as exc:
        raise LabelsError(f"labels file {path} cannot be read: {exc.strerror}") from None


def _parse_labels(path: Path, reader: csv.DictReader, index: dict[str, int]) -> dict[int, FrameLabel]:
    labels: dict[int, FrameLabel] = {}
    if not reader.fieldnames or not {"frame", "label"} <= set(reader.fieldnames):
        raise LabelsError(f"labels file {path}: header must have 'frame' and 'label' columns, "
                          f"got {reader.fieldnames}")
    for row_number, row in enumerate(reader, start=2):
        try:
            frame = int(row["frame"])
        except (TypeError, ValueError):
            raise LabelsError(f"labels file {path} row {row_number}: frame {row['frame']!r} is not an integer"
                              ) from None
        names = [n for n in (row["label"] or "").split("|") if n]
        unknown = [n for n in names if n not in index]
        if not names or unknown:
            raise LabelsError(f"labels file {path} row {row_number}: label {row['label']!r} is not a class "
                              f"of the model (unknown: {unknown or 'empty'})")
        if frame in labels:
            raise LabelsError(f"labels file {path} row {row_number}: frame {frame} labelled twice")
        labels[frame] = FrameLabel(frozenset(index[n] for n in names), row.get("condition") or "")
    return labels


@dataclass
class ReplayRecord:
    """Per-frame series for the summary and the plots."""

    frames: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    drift_score: list[float] = field(default_factory=list)
    # the unadapted model, UnMix-TNS before LAME, and what the agent answered (published as `adapted`)
    correct: dict[str, list[bool]] = field(default_factory=lambda: {"unadapted": [], "adapted": [], "answer": []})
    scored: list[int] = field(default_factory=list)  # the frames `correct` and `conditions` are about
    conditions: list[str] = field(default_factory=list)
    events: list[DriftEvent] = field(default_factory=list)

    def add(self, result: FrameResult, label: FrameLabel | None) -> None:
        self.frames.append(result.frame)
        self.latency_ms.append(result.latency_ms)
        self.drift_score.append(result.drift_score)
        if result.drift:
            self.events.append(result.drift)
        if label is not None and result.raw is not None:
            self.scored.append(result.frame)
            self.conditions.append(label.condition)
            self.correct["unadapted"].append(int(np.argmax(result.raw)) in label.accepted)
            self.correct["adapted"].append(int(np.argmax(result.adapted)) in label.accepted)
            self.correct["answer"].append(int(np.argmax(result.probs)) in label.accepted)


def replay(pipeline: CameraPipeline, source: FileSource, labels: dict[int, FrameLabel] | None = None,
           progress: bool = True) -> tuple[dict, ReplayRecord]:
    record = ReplayRecord()
    started = time.monotonic()
    bar = tqdm(total=source.frame_count or None, unit="frame", disable=not progress, desc=source.path.name)
    with bar:
        for result in pipeline.stream(source.frames()):
            bar.update(pipeline.counters.processed + pipeline.counters.rejected_total - bar.n)
            record.add(result, labels.get(result.frame) if labels else None)
            if result.drift:
                line = (f"frame {result.frame}: drift {result.drift.type} (score {result.drift.score:.1f}, "
                        f"layers {', '.join(t['layer'] for t in result.drift.top_layers)})")
                bar.write(line) if progress else log.info(line)
            if bar.n % 10 == 0:
                bar.set_postfix(fps=f"{bar.format_dict['rate'] or 0:.1f}", drift=pipeline.drift.active,
                                rejected=pipeline.counters.rejected_total)
    return summarize(pipeline, source, record, time.monotonic() - started), record


def summarize(pipeline: CameraPipeline, source: FileSource, record: ReplayRecord, elapsed: float) -> dict:
    counters = pipeline.counters
    lat = np.asarray(record.latency_ms) if record.latency_ms else np.zeros(1)
    summary = {
        "video": str(source.path),
        "frames_read": source.counters.read,
        "frames_processed": counters.processed,
        "frames_skipped": source.counters.skipped,
        "frames_rejected": counters.rejected_total,
        "rejected_reasons": dict(counters.rejected),
        "source_errors": source.counters.errors,
        "truncated": source.truncated,
        "fps": round(counters.processed / elapsed, 2) if elapsed else None,
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
        "provider": pipeline.session.provider,
        "provider_reason": pipeline.session.provider_reason,
        "drift_events": [{"type": e.type, "frame": e.frame, "episode": e.episode} for e in record.events],
    }
    if record.conditions:
        summary["accuracy"] = {name: round(float(np.mean(v)), 4) for name, v in record.correct.items()}
        by_condition = {}
        for condition in dict.fromkeys(record.conditions):
            mask = np.asarray(record.conditions) == condition
            by_condition[condition] = {name: round(float(np.mean(np.asarray(v)[mask])), 4)
                                       for name, v in record.correct.items()}
        summary["accuracy_by_condition"] = by_condition
    return summary


def format_table(summary: dict) -> str:
    counts = (summary["frames_read"], summary["frames_processed"], summary["frames_skipped"],
              summary["frames_rejected"])
    rows = [("frames read / processed / skipped / rejected", " / ".join(map(str, counts))),
            ("throughput", f"{summary['fps']} frames/s"),
            ("latency p50 / p95", f"{summary['latency_ms_p50']} / {summary['latency_ms_p95']} ms"),
            ("provider", summary["provider"]),
            ("drift events", ", ".join(f"{e['type']}@{e['frame']}" for e in summary["drift_events"]) or "none")]
    rows += [("input damaged", error) for error in summary["source_errors"]]
    for name, value in summary.get("accuracy", {}).items():
        rows.append((f"accuracy {name}", f"{100 * value:.1f}%"))
    for condition, accs in summary.get("accuracy_by_condition", {}).items():
        rows.append((f"  {condition}", "  ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def plot_report(record: ReplayRecord, summary: dict, path: str | Path) -> Path | None:
    """Accuracy over time (with labels), shift score with alert markers, latency. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'tta-agent[demo]'): no PNG report")
        return None
    panels = 3 if record.conditions else 2
    fig, axes = plt.subplots(panels, 1, figsize=(10, 2.8 * panels), sharex=True)
    frames = np.asarray(record.frames)
    ax = iter(axes)
    if record.conditions:
        a = next(ax)
        scored = np.asarray(record.scored)
        for name, style in ACCURACY_LINES.items():
            v = np.asarray(record.correct[name], float)
            a.plot(scored, 100 * trailing_mean(v, ACCURACY_WINDOW), label=f"{name} ({100 * v.mean():.1f}%)", **style)
        a.set_ylabel(f"accuracy, mean of the\nlast {ACCURACY_WINDOW} frames (%)")
        a.set_ylim(-3, 118)  # the band above 100 holds the condition names, clear of the curves
        a.set_yticks(range(0, 101, 25))
        a.legend(loc="lower left", fontsize=8, ncol=3, framealpha=0.9)
        _shade_conditions(a, scored, record.conditions)
    a = next(ax)
    a.plot(frames, record.drift_score, lw=0.8, color="tab:purple")
    a.set_ylabel("drift score (spreads)")
    a.set_ylim(0, max(max(record.drift_score, default=1.0), 1.0) * 1.35)  # room for the event names
    for event in record.events:
        a.axvline(event.frame, color={"start": "red", "update": "orange", "end": "green"}[event.type], ls="--",
                  lw=1)
        a.text(event.frame, 0.97, f" {event.type}", transform=a.get_xaxis_transform(), fontsize=7, rotation=90,
               va="top", ha="right")
    a = next(ax)
    a.plot(frames, record.latency_ms, lw=0.6, color="tab:gray")
    a.set_ylabel("latency (ms)")
    a.set_xlabel("frame")
    fig.suptitle(f"{Path(summary['video']).name}: {summary['fps']} frames/s on {summary['provider']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# the unadapted line wide and pale underneath, so that it shows where the others run on it
ACCURACY_LINES = {"unadapted": {"color": "0.6", "lw": 3.2}, "adapted": {"color": "tab:blue", "lw": 1.3},
                  "answer": {"color": "tab:red", "lw": 1.1, "ls": (0, (4, 2))}}
ACCURACY_WINDOW = 30


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Each frame's mean over itself and the frames before it, at most `window`: no edge pulled towards 0."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _shade_conditions(ax, frames, conditions) -> None:
    start = 0
    for i in range(1, len(conditions) + 1):
        if i == len(conditions) or conditions[i] != conditions[start]:
            if conditions[start] != "clean":
                ax.axvspan(frames[start], frames[i - 1], alpha=0.12, color="k")
                ax.text(frames[start], 104, f" {conditions[start]}", fontsize=8, va="bottom")
            start = i


def write_json(summary: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(summary, indent=2))
