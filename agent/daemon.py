"""The daemon: one main loop over the cameras, MQTT, systemd notify, signals and checkpoints.

    loop: for each camera, take its newest frame -> pipeline -> publish
          then housekeeping: commands, stats, checkpoints, watchdog
SIGTERM/SIGINT stop (offline published, alerts flushed, state saved), SIGHUP reloads
what can change without a restart (LAME, drift, publishing, log level).
"""
from __future__ import annotations

import faulthandler
import logging
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, load_config, read_password
from .contract import ContractError, ModelInfo, read_model_info
from .drift import DriftEvent
from .exits import EXIT_FAILURE, EXIT_OK
from .files import FolderInUse, FolderLock, WriteTrouble
from .flag import SignalFlag
from .mqtt import PAHO_LOGGER, SCHEMA_VERSION, Command, MqttLink, utc
from .persistence import StateFolder
from .pipeline import CameraPipeline, FrameResult, build_pipeline, open_camera_session
from .preflight import check, check_model, report
from .sdnotify import Notifier
from .sources import FileSource, LiveSource, SourceError, open_source
from .spool import Spool

FIRST_CONNECT_WAIT_S = 5.0
STOP_REPORT_S = 8.0  # a stop still running after this long prints every thread's stack (to the journal)
CLASS_MIN_INTERVAL_S = 1.0
# SIGHUP applies everything but what start-up alone reads: the connection, the sources, the model session
RESTART = ("device_id", "model", "cameras", "mqtt", "state", "http")
RESTART_ADVANCED = ("model", "sources", "state", "http")
SESSION_KEYS = ("method", "seed", "folded")  # advanced.adaptation keys the model session was opened with
RELOADABLE_MQTT = ("top_k", "predictions_every", "stats_interval_s")  # advanced.mqtt keys read per message
log = logging.getLogger(__name__)


@dataclass
class Camera:
    name: str
    source: FileSource | LiveSource
    pipeline: CameraPipeline
    latencies: deque = field(default_factory=lambda: deque(maxlen=1000))
    frame_times: deque = field(default_factory=lambda: deque(maxlen=100))
    drift_since: str | None = None
    fallbacks_seen: int = 0  # session fallbacks already announced in stats
    published_class: tuple[str | None, float] = (None, 0.0)  # the retained class topic's label, when sent

    def health(self) -> dict:
        """Whether frames come, and if not why: the source's own account."""
        last = getattr(self.source, "last_frame_at", None)
        if last is None and self.frame_times:
            last = self.frame_times[-1]
        return {"connected": bool(self.source.connected), "last_error": self.source.last_error,
                "since_last_frame_s": None if last is None else round(time.monotonic() - last, 1)}

    @property
    def fps(self) -> float:
        if len(self.frame_times) < 2:
            return 0.0
        span = self.frame_times[-1] - self.frame_times[0]
        return (len(self.frame_times) - 1) / span if span > 0 else 0.0


def _drift_payload(device: str, camera: str, event: DriftEvent) -> dict:
    return {"schema": SCHEMA_VERSION, "device": device, "camera": camera, "type": event.type,
            "episode": event.episode, "frame": event.frame, "time": utc(event.time), "score": event.score,
            "threshold": event.threshold, "detector": event.detector, "reason": event.reason,
            "condition": event.condition, "statistics": event.statistics, "top_layers": event.top_layers}


def _top_k(probs: np.ndarray | None, labels: tuple[str, ...], k: int) -> list[dict] | None:
    if probs is None:
        return None
    order = np.argsort(-probs)[:k]
    return [{"label": labels[i], "index": int(i), "p": round(float(probs[i]), 4)} for i in order]


def _changed(old, new, keys, prefix: str) -> list[str]:
    """Key paths among `keys` whose values differ; a section is named by its own keys."""
    out = []
    for k in keys:
        a, b = getattr(old, k), getattr(new, k)
        if a != b:
            fields = getattr(type(a), "model_fields", None) if a is not None and b is not None else None
            out += _changed(a, b, fields, f"{prefix}{k}.") if fields else [prefix + k]
    return out


def _reloadable(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with what needs a restart kept from `old`, and the key paths of what was so kept."""
    a_old, a_new = old.advanced, new.advanced
    mqtt_fixed = [k for k in type(a_old.mqtt).model_fields if k not in RELOADABLE_MQTT]
    fixed = (_changed(old, new, RESTART, "") + _changed(a_old, a_new, RESTART_ADVANCED, "advanced.")
             + _changed(a_old.adaptation, a_new.adaptation, SESSION_KEYS, "advanced.adaptation.")
             + _changed(a_old.mqtt, a_new.mqtt, mqtt_fixed, "advanced.mqtt."))
    advanced = a_new.model_copy(update={
        **{k: getattr(a_old, k) for k in RESTART_ADVANCED},
        "adaptation": a_new.adaptation.model_copy(update={k: getattr(a_old.adaptation, k) for k in SESSION_KEYS}),
        "mqtt": a_new.mqtt.model_copy(update={k: getattr(a_old.mqtt, k) for k in mqtt_fixed})})
    kept = new.model_copy(update={**{k: getattr(old, k) for k in RESTART}, "advanced": advanced})
    return kept, fixed


class Agent:
    def __init__(self, config: Config, config_path: Path | None = None, broker: tuple[str, int] | None = None,
                 sinks: list[Callable[[str, FrameResult], None]] | None = None, info: ModelInfo | None = None,
                 stop: SignalFlag | None = None, reload: SignalFlag | None = None):
        self.config = config
        self.config_path = config_path
        self.sinks = sinks or []
        self.notifier = Notifier()
        self._stop = stop or SignalFlag()  # set by signal handlers: no lock (agent/flag.py)
        self._reload = reload or SignalFlag()
        self.started = time.time()
        self.commands: queue.Queue[Command] = queue.Queue(maxsize=100)
        state_dir = config.state.dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(state_dir)  # first: nothing is read or written before this agent owns the folder
        try:
            self._open(config, info, broker)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, config: Config, info: ModelInfo | None, broker: tuple[str, int] | None) -> None:
        state_dir = config.state.dir
        self.writes = WriteTrouble()
        self.state = StateFolder(state_dir, self.writes)
        self.info = info or read_model_info(config.model.path)
        self.model_file = _identity(config.model.path)
        self.cameras = [self._camera(c) for c in config.cameras]
        self.spool = Spool(state_dir / "spool", config.advanced.state.spool_max_events, SCHEMA_VERSION, self.writes)
        host, port = broker or (config.mqtt.host, config.mqtt.port)
        self.mqtt = MqttLink(config.mqtt, config.device_id, [c.name for c in self.cameras], self.spool,
                             self.commands, read_password(config.mqtt), host=host, port=port,
                             advanced=config.advanced.mqtt)
        self.heartbeat: float | None = None  # time.monotonic() of the main loop's latest round
        http, host = config.http, config.advanced.http.host
        try:
            self.endpoint = None
            if http.enabled:  # prometheus-client is loaded only when /metrics is served
                from .endpoint import HealthServer

                self.endpoint = HealthServer(self, host, http.port, config.advanced.http.stall_s)
        except OSError as exc:
            raise ConfigError(f"http: cannot listen on {host}:{http.port}: {exc.strerror}") from None

    def _camera(self, cfg) -> Camera:
        pipeline = build_pipeline(self.config, open_camera_session(self.config, self.info))
        since = self.state.resume(cfg.name, pipeline)
        camera = Camera(cfg.name, open_source(cfg, self.config.advanced.sources), pipeline)
        camera.drift_since = since
        return camera

    def _publish_drift_state(self, camera: Camera, frame: int | None, now: float) -> None:
        """The retained drift/state, always the detector's own."""
        drift = camera.pipeline.drift
        self.mqtt.publish_retained(f"{camera.name}/drift/state", {
            "schema": SCHEMA_VERSION, "active": drift.active, "episode": drift.episode, "since": camera.drift_since,
            "score": round(drift.score, 2), "frame": frame, "time": utc(now)})

    # -- control from outside -----------------------------------------------------------------
    def request_stop(self, *_):
        self._stop.set()

    def request_reload(self, *_):
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # -- the main loop ------------------------------------------------------------------------
    def run(self) -> int:
        """The main loop until a stop (or, with exit_when_done, the end of every file); a failure inside it is
        logged with its traceback, what can be saved is saved, and the exit code says it failed."""
        try:
            self._loop()
        except Exception:
            log.critical("the main loop failed (exit %d; please report this with the traceback below)",
                         EXIT_FAILURE, exc_info=True)
            try:
                self._shutdown()
            except Exception:
                log.exception("and shutting down after the failure failed too")
            return EXIT_FAILURE
        return self._shutdown()

    def _loop(self) -> None:
        self.mqtt.start()
        # give the broker a moment, so a replay's first predictions are not dropped for want of a
        # connection; a broker that is down at start only delays the loop this long
        if not self.mqtt.connected.wait(FIRST_CONNECT_WAIT_S):
            log.warning("no broker connection after %.0f s; running anyway (alerts spool, predictions "
                        "are dropped and counted until it connects)", FIRST_CONNECT_WAIT_S)
        for camera in self.cameras:
            self._publish_drift_state(camera, None, time.time())
        self.notifier.ready(self._status_line())
        log.info("agent %s running %d camera(s) on %s", self.config.device_id, len(self.cameras),
                 self.cameras[0].pipeline.session.provider)
        if self.endpoint:
            self.endpoint.start()
        now = time.monotonic()
        next_stats, next_checkpoint, next_ping = now, now + self.config.advanced.state.checkpoint_every_s, now
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            worked = False
            for camera in self.cameras:
                frame = camera.source.poll()
                if frame is not None:
                    self._process(camera, frame)
                    worked = True
            self._handle_commands()
            if self._reload.is_set():
                self._apply_reload()
            now = time.monotonic()
            self.mqtt.check_delivery()
            if now >= next_stats:
                self.spool.retry()
                self._publish_stats()
                next_stats = now + self.config.advanced.mqtt.stats_interval_s
            if now >= next_checkpoint:
                self._checkpoint()
                next_checkpoint = now + self.config.advanced.state.checkpoint_every_s
            if self.notifier.watchdog_interval and now >= next_ping:
                self.notifier.watchdog()  # only a loop that comes round pings: a hang trips systemd's watchdog
                next_ping = now + self.notifier.watchdog_interval
            if self.config.exit_when_done and all(c.source.finished for c in self.cameras):
                log.info("every file source has ended")
                break
            if not worked:
                self._stop.wait(0.002)

    def _process(self, camera: Camera, frame) -> None:
        result = camera.pipeline.process(frame)
        if result is None:
            return
        camera.latencies.append(result.latency_ms)
        if self.endpoint:
            self.endpoint.metrics.latency.labels(camera.name).observe(result.latency_ms / 1000)
        if log.isEnabledFor(logging.DEBUG):
            top = "-" if result.probs is None else self.info.labels[int(np.argmax(result.probs))]
            log.debug("camera %s frame %d: %s, strength %.2f, drift score %.2f, LAME %s, %.1f ms", camera.name,
                      result.frame, top, result.strength, result.drift_score, result.lame_applied,
                      result.latency_ms)
        camera.frame_times.append(time.monotonic())
        labels, k = self.info.labels, self.config.advanced.mqtt.top_k
        if result.frame % self.config.advanced.mqtt.predictions_every == 0:
            self.mqtt.publish_prediction(camera.name, {
                "schema": SCHEMA_VERSION, "device": self.config.device_id, "camera": camera.name,
                "frame": result.frame, "time": utc(time.time()), "captured": utc(result.captured),
                "latency_ms": round(result.latency_ms, 2),
                "adapted": _top_k(result.probs, labels, k), "raw": _top_k(result.raw, labels, k),
                "lame_applied": result.lame_applied, "adaptation": camera.pipeline.adaptation,
                "adaptation_strength": round(result.strength, 3),
                "drift_score": round(result.drift_score, 3),
            })
        self._publish_class(camera, result)
        if result.drift is not None:
            event = result.drift
            log.info("drift %s camera=%s episode=%s frame=%d score=%.2f", event.type, camera.name, event.episode,
                     event.frame, event.score)
            self.mqtt.publish_drift(camera.name, _drift_payload(self.config.device_id, camera.name, event))
            camera.drift_since = utc(event.time) if event.type == "start" else (
                None if event.type == "end" else camera.drift_since)
            self._publish_drift_state(camera, event.frame, event.time)
            if event.type != "update":
                self.state.save_drift(camera.name, camera.pipeline, camera.drift_since)
        session = camera.pipeline.session
        if session.fallbacks != camera.fallbacks_seen:
            camera.fallbacks_seen = session.fallbacks
            self._publish_stats()  # tell subscribers at once that the agent is degraded
        for sink in self.sinks:
            sink(camera.name, result)

    def _publish_class(self, camera: Camera, result: FrameResult) -> None:
        """The retained class topic (Home Assistant's sensor): on a change, at most once a second."""
        if result.probs is None:
            return
        label = self.info.labels[int(np.argmax(result.probs))]
        now = time.monotonic()
        if label != camera.published_class[0] and now - camera.published_class[1] >= CLASS_MIN_INTERVAL_S:
            camera.published_class = (label, now)
            self.mqtt.publish_retained(f"{camera.name}/class", {
                "schema": SCHEMA_VERSION, "label": label, "p": round(float(result.probs.max()), 4),
                "frame": result.frame, "time": utc(time.time())})

    def _handle_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            camera = next(c for c in self.cameras if c.name == command.camera)
            log.info("command: %s %s = %s", command.camera, command.kind, command.value)
            if command.kind == "adaptation":
                if command.value == "reset":
                    camera.pipeline.reset()
                else:
                    camera.pipeline.set_adaptation(command.value)
            else:
                camera.pipeline.lame_mode = command.value if camera.pipeline.lame else "off"

    def _apply_reload(self) -> None:
        self._reload.clear()
        if self.config_path is not None:
            self._reload_config()
        self._reload_model()

    def _reload_config(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running config: %s", problem)
            return
        old = self.config
        new, fixed = _reloadable(old, new)
        if fixed:
            log.warning("reload: %s changed; those take effect after a restart", ", ".join(fixed))
        self.config = new
        set_log_level(new.log_level)
        for camera in self.cameras:
            pipeline = camera.pipeline
            # a mode set by an MQTT command stays unless the file's own value changed
            adaptation = new.adaptation.mode if new.adaptation.mode != old.adaptation.mode else pipeline.adaptation
            lame_mode = new.lame.mode if new.lame.mode != old.lame.mode else pipeline.lame_mode
            try:
                pipeline.configure(new)  # the drift reference and any open episode go on under the new thresholds
            except ContractError as exc:
                log.error("reload refused for camera %s: %s", camera.name, exc)
                continue
            pipeline.lame_mode = lame_mode if pipeline.lame else "off"
            pipeline.set_adaptation(adaptation)
            if (adaptation, pipeline.lame_mode) != (new.adaptation.mode, new.lame.mode):
                log.info("reload: camera %s keeps adaptation %s, LAME %s (set by MQTT command)", camera.name,
                         adaptation, pipeline.lame_mode)
        log.info("reloaded %s", self.config_path)

    def _reload_model(self) -> None:
        """The model file replaced on disk: a valid one is run from now on, an invalid one is refused loudly and
        the running model kept."""
        path, identity = self.config.model.path, _identity(self.config.model.path)
        if identity == self.model_file:
            return
        info, problems = check_model(self.config)
        pipelines = []
        try:
            for camera in self.cameras if info and not problems else ():
                pipeline = build_pipeline(self.config, open_camera_session(self.config, info))
                carried = camera.pipeline.drift.state()
                if carried is not None:  # the imaging statistics do not depend on the model; the layers' departure does
                    pipeline.drift.restore({**carried, "departure": None, "by_features": False})
                pipeline.set_adaptation(camera.pipeline.adaptation)
                pipeline.lame_mode = camera.pipeline.lame_mode if pipeline.lame else "off"
                pipelines.append(pipeline)
        except (ContractError, SourceError, ValueError, RuntimeError) as exc:
            problems = [str(exc)]
        if problems or not info:
            log.error("reload: the model file %s changed on disk and cannot be run (%s); the running model is "
                      "kept. Put a valid model there (tta-export): as it is, a restart would refuse to start",
                      path, "; ".join(problems))
            return
        for camera, pipeline in zip(self.cameras, pipelines):
            camera.pipeline, camera.fallbacks_seen = pipeline, 0
        self.info, self.model_file = info, identity
        log.warning("reload: the model file %s changed on disk; running it now (%d classes, %s layout); "
                    "adaptation starts again from its source statistics", path, len(info.labels),
                    info.adaptation.layout)

    def _checkpoint(self) -> None:
        for camera in self.cameras:
            self.state.checkpoint(camera.name, camera.pipeline, camera.drift_since)

    # -- health -------------------------------------------------------------------------------
    def stats(self) -> dict:
        cameras = {}
        for c in self.cameras:
            lat = np.asarray(c.latencies) if c.latencies else np.zeros(1)
            p = c.pipeline
            cameras[c.name] = {
                "fps": round(c.fps, 2), "frames_read": c.source.counters.read,
                "frames_processed": p.counters.processed, "frames_skipped": c.source.counters.skipped,
                "frames_rejected": p.counters.rejected_total, "reconnects": c.source.counters.reconnects,
                "stalls": c.source.counters.stalls, "latency_ms": {q: round(float(np.percentile(lat, v)), 2)
                                                                   for q, v in (("p50", 50), ("p95", 95),
                                                                                ("p99", 99))},
                "adaptation": p.adaptation, "adaptation_strength": round(p.strength, 3),
                "guard_fired": p.guard.fired if p.guard else 0,
                "frames_adapted": p.session.frames, "lame_active": p.lame_active,
                "drift_active": p.drift.active, "provider": p.session.provider, **c.health(),
            }
        sessions = [c.pipeline.session for c in self.cameras]
        degraded = self.degraded()
        return {
            "schema": SCHEMA_VERSION, "device": self.config.device_id, "time": utc(time.time()),
            "uptime_s": round(time.time() - self.started, 1), "status": "degraded" if degraded else "ok",
            "degraded_reason": degraded[0] if degraded else None, "provider": sessions[0].provider,
            "provider_reason": sessions[0].provider_reason, "cameras": cameras,
            "mqtt": {"connected": self.mqtt.connected.is_set(), "reconnects": max(self.mqtt.reconnects, 0),
                     "queue_depth": self.mqtt.queue_depth, "predictions_sent": self.mqtt.predictions_sent,
                     "predictions_dropped": self.mqtt.predictions_dropped, "alerts_spooled": len(self.spool),
                     "alerts_acked": self.mqtt.alerts_acked, "alerts_dropped": self.spool.dropped,
                     "commands_rejected": self.mqtt.commands_rejected,
                     "commands_ignored": self.mqtt.commands_ignored, "delivery": self.mqtt.delivery},
            "storage": {"write_failures": self.writes.failures, "failing": self.writes.reason,
                        "alerts_in_memory": self.spool.held},
        }

    def degraded(self) -> list[str]:
        """Why the agent is not fully working: a GPU fallback, a camera that is down, writes that fail, a broker
        that does not deliver what it accepts."""
        reasons = [c.pipeline.session.fallback_reason for c in self.cameras if c.pipeline.session.fallback_reason]
        reasons += [f"camera {c.name}: {c.source.last_error}" for c in self.cameras
                    if not c.source.connected and not c.source.finished and c.source.last_error]
        return reasons + [r for r in (self.writes.reason, self.mqtt.problem) if r]

    def _status_line(self) -> str:
        fps = sum(c.fps for c in self.cameras)
        broker = "connected" if self.mqtt.connected.is_set() else "disconnected"
        provider = self.cameras[0].pipeline.session.provider.removesuffix("ExecutionProvider")
        return f"{fps:.1f} fps on {provider}, broker {broker}, {len(self.spool)} alerts spooled"

    def _publish_stats(self) -> None:
        self.mqtt.publish_retained("stats", self.stats())
        self.notifier.status(self._status_line())

    def _shutdown(self) -> int:
        self.notifier.stopping()
        faulthandler.dump_traceback_later(STOP_REPORT_S)
        log.info("stopping: saving state, flushing %d spooled alert(s)", len(self.spool))
        self._checkpoint()
        for camera in self.cameras:
            camera.source.stop()
        self._publish_stats()
        self.mqtt.stop(flush_timeout=3.0)
        self.spool.retry()
        if self.spool.held:
            log.error("%d drift alert(s) were neither delivered nor written to disk (%s): they are lost with this "
                      "stop", self.spool.held, self.writes.reason)
        if self.endpoint:
            self.endpoint.stop()
        self.lock.release()
        faulthandler.cancel_dump_traceback_later()
        return EXIT_OK


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells a file replaced or rewritten on disk from the one that was read: inode, size, mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # paho narrates each reconnect attempt at error level; its lines are for debugging only
    logging.getLogger(PAHO_LOGGER).setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL + 1)


def run_daemon(config_path: Path, stop: SignalFlag, reload: SignalFlag) -> int:
    """`tta-agent run`: `stop` and `reload` are set by the signal handlers the command line installed first."""
    config = load_config(config_path)
    set_log_level(config.log_level)
    log.info("starting: %s, model %s, %d camera(s)", config_path, config.model.path, len(config.cameras))
    info, problems = check(config)
    if problems:
        return report(config_path, problems)
    try:
        agent = Agent(config, config_path, info=info, stop=stop, reload=reload)
    except (SourceError, ConfigError, ContractError, FolderInUse) as exc:
        return report(config_path, [str(exc)])
    return agent.run()
