"""The optional HTTP endpoint: /healthz for probes and /metrics for Prometheus (prometheus-client).

Off by default and bound to localhost unless configured. /healthz answers 200 while the main
loop comes round (what systemd's watchdog also watches) and 503 once it has not for
`advanced.http.stall_s`, or before the loop has started.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class AgentMetrics:
    """A Prometheus collector over the agent's own counters, read at scrape time, plus the latency histogram."""

    def __init__(self, agent):
        self.agent = agent
        self.registry = CollectorRegistry()
        self.latency = Histogram("tta_frame_latency_seconds", "time from a frame's capture to its answer",
                                 ["camera"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def collect(self):
        agent = self.agent
        per_camera = {
            "frames_read": CounterMetricFamily("tta_frames_read", "frames decoded from the source", labels=["camera"]),
            "frames_processed": CounterMetricFamily("tta_frames_processed", "frames the model answered",
                                                    labels=["camera"]),
            "frames_skipped": CounterMetricFamily("tta_frames_skipped", "frames superseded by a newer one",
                                                  labels=["camera"]),
            "frames_rejected": CounterMetricFamily("tta_frames_rejected", "frames that could not be used",
                                                   labels=["camera"]),
            "reconnects": CounterMetricFamily("tta_source_reconnects", "source reopened after a failure",
                                              labels=["camera"]),
            "fps": GaugeMetricFamily("tta_fps", "frames answered per second, recent", labels=["camera"]),
            "strength": GaugeMetricFamily("tta_adaptation_strength", "0: unadapted model, 1: full UnMix-TNS",
                                          labels=["camera"]),
            "drift": GaugeMetricFamily("tta_drift_active", "1 while a drift episode is open", labels=["camera"]),
            "connected": GaugeMetricFamily("tta_camera_connected", "1 while the source delivers",
                                           labels=["camera"]),
        }
        for camera in agent.cameras:
            source, pipeline, name = camera.source, camera.pipeline, [camera.name]
            per_camera["frames_read"].add_metric(name, source.counters.read)
            per_camera["frames_processed"].add_metric(name, pipeline.counters.processed)
            per_camera["frames_skipped"].add_metric(name, source.counters.skipped)
            per_camera["frames_rejected"].add_metric(name, pipeline.counters.rejected_total)
            per_camera["reconnects"].add_metric(name, source.counters.reconnects)
            per_camera["fps"].add_metric(name, camera.fps)
            per_camera["strength"].add_metric(name, pipeline.strength)
            per_camera["drift"].add_metric(name, float(pipeline.drift.active))
            per_camera["connected"].add_metric(name, float(bool(source.connected)))
        yield from per_camera.values()
        mqtt, spool = agent.mqtt, agent.spool
        yield GaugeMetricFamily("tta_mqtt_connected", "1 while connected to the broker",
                                value=float(mqtt.connected.is_set()))
        yield CounterMetricFamily("tta_mqtt_reconnects", "broker reconnections", value=max(mqtt.reconnects, 0))
        yield CounterMetricFamily("tta_predictions_sent", "prediction messages published",
                                  value=mqtt.predictions_sent)
        yield CounterMetricFamily("tta_predictions_dropped", "predictions dropped while offline or queue full",
                                  value=mqtt.predictions_dropped)
        yield GaugeMetricFamily("tta_alerts_spooled", "drift alerts on disk waiting for the broker",
                                value=len(spool))
        yield CounterMetricFamily("tta_alerts_acked", "drift alerts the broker acknowledged",
                                  value=mqtt.alerts_acked)
        yield CounterMetricFamily("tta_alerts_dropped", "drift alerts dropped from a full spool",
                                  value=spool.dropped)
        yield GaugeMetricFamily("tta_mqtt_delivery_failing", "1 while the broker does not deliver what the agent "
                                "publishes (read back): an ACL that drops it", value=float(mqtt.delivery == "failing"))
        yield CounterMetricFamily("tta_write_failures", "writes to state.dir that failed (a full disk)",
                                  value=agent.writes.failures)
        yield GaugeMetricFamily("tta_alerts_in_memory", "drift alerts the disk could not take, held in memory",
                                value=spool.held)
        yield CounterMetricFamily("tta_commands_rejected", "MQTT commands refused", value=mqtt.commands_rejected)
        yield GaugeMetricFamily("tta_degraded", "1 when stats say degraded", value=float(bool(agent.degraded())))
        provider = InfoMetricFamily("tta_provider", "the execution provider each camera runs on",
                                    labels=["camera"])
        for camera in agent.cameras:
            provider.add_metric([camera.name], {"provider": camera.pipeline.session.provider})
        yield provider


class HealthServer:
    """/healthz and /metrics on a thread of its own."""

    def __init__(self, agent, host: str, port: int, stall_s: float):
        self.agent, self.stall_s = agent, stall_s
        self.metrics = AgentMetrics(agent)
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("HTTP /healthz and /metrics on %s:%d", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def health(self) -> tuple[int, dict]:
        beat = self.agent.heartbeat
        age = None if beat is None else time.monotonic() - beat
        live = age is not None and age <= self.stall_s
        reason = ("starting: the main loop has not run yet" if age is None else
                  None if live else f"main loop stalled: last round {age:.1f} s ago (limit {self.stall_s:g} s)")
        degraded = self.agent.degraded()
        doc = {"live": live, "status": "unhealthy" if not live else "degraded" if degraded else "ok",
               "reason": reason or (degraded[0] if degraded else None),
               "loop_age_s": None if age is None else round(age, 2)}
        return (200 if live else 503), doc

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    code, doc = server.health()
                    self._send(code, "application/json", json.dumps(doc).encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.metrics.registry))
                else:
                    self._send(404, "text/plain", b"not found: /healthz or /metrics\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("http %s", fmt % args)

        return Handler
