"""The agent's public interface over MQTT (paho-mqtt 2.x).

Topics under <prefix>/<device>:
    availability                        online/offline, retained; offline is the will
    stats                               periodic health, retained
    <camera>/prediction                 every frame (or every Nth), QoS 0, dropped and counted when offline
    <camera>/drift                      start/update/end events, QoS 1, through the on-disk spool
    <camera>/drift/state                the current drift state, retained
    <camera>/class                      the answer's top class when it changes (at most 1/s), retained
    <camera>/adaptation/set             command in: on | frozen | off | reset
    <camera>/lame/set                   command in: auto | on | off
    probe                               a random token the agent publishes and reads back (delivery check)
Payloads are JSON with a `schema` version (agent/schemas/*.json).

A broker can accept a publish and still drop it (an ACL that denies the topic acknowledges it all
the same). So the agent reads back what it publishes: it subscribes to its own drift topics and
probe, an alert leaves the spool only once it has come back, and a probe goes out at each connect
and every `advanced.mqtt.verify_every_s`. What does not come back within VERIFY_TIMEOUT_S turns
`delivery` to `failing`: logged, in stats and /metrics, and alerts wait in the spool.
"""
from __future__ import annotations

import json
import logging
import queue
import ssl
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

import paho.mqtt.client as paho

from .config import AdvancedMqttConfig, MqttConfig
from .spool import Spool
from .vocabulary import ADAPTATION_MODES, LAME_MODES

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
COMMANDS = {"adaptation": (*ADAPTATION_MODES, "reset"), "lame": LAME_MODES}
MAX_COMMAND_BYTES = 64
PAHO_LOGGER = "agent.mqtt.paho"  # paho's own lines; shown only at log_level debug
TROUBLE_REPEAT_S = 60.0  # a broker problem that persists is logged again this often
VERIFY_TIMEOUT_S = 10.0  # a publish not read back within this long is taken as not delivered
SHORT_CONNECTION_S = 10.0  # connections closed by the broker sooner than this after it accepted them...
TAKEOVER_COUNT = 3  # ...this many times within TAKEOVER_WINDOW_S: another client has the same client id
TAKEOVER_WINDOW_S = 60.0
NETWORK_STOP_WAIT_S = 3.0  # paho's loop_stop joins its thread unbounded; a stop must not wait on it forever


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Command:
    camera: str
    kind: str  # "adaptation" or "lame"
    value: str


class BrokerTrouble:
    """Says why the broker cannot be reached: at once, again when the reason changes, and every
    TROUBLE_REPEAT_S while it lasts; then once how long it lasted."""

    def __init__(self, where: str):
        self.where = where
        self.since: float | None = None
        self._said: tuple[str, float] | None = None

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if self._said is None or self._said[0] != reason or now - self._said[1] >= TROUBLE_REPEAT_S:
            log.error("broker %s: %s (no connection for %.0f s; retrying)", self.where, reason, now - self.since)
            self._said = (reason, now)

    def connected(self) -> None:
        if self.since is not None:
            log.info("broker %s reached after %.0f s without a connection", self.where, time.monotonic() - self.since)
        self.since, self._said = None, None


def _reason(exc: BaseException | None, tls: bool) -> str:
    # a plain listener answers a TLS hello by resetting the connection: with TLS on, say so
    if isinstance(exc, ssl.SSLError) or (tls and isinstance(exc, (ConnectionResetError, BrokenPipeError))):
        detail = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc.strerror or exc
        return (f"TLS handshake failed ({detail}); is this port a TLS listener, and mqtt.tls.ca the CA that "
                "signed its certificate?")
    if exc is None:
        return "cannot connect"
    return f"cannot connect: {exc.strerror or exc}" if isinstance(exc, OSError) else f"cannot connect: {exc}"


class MqttLink:
    def __init__(self, cfg: MqttConfig, device_id: str, cameras: list[str], spool: Spool,
                 commands: queue.Queue, password: str | None = None, host: str | None = None,
                 port: int | None = None, advanced: AdvancedMqttConfig | None = None):
        self.cfg, self.advanced = cfg, advanced or AdvancedMqttConfig()
        self.device_id = device_id
        self.cameras = set(cameras)
        self.spool = spool
        self.commands = commands
        self.host, self.port = host or cfg.host, port or cfg.port
        self.base = f"{cfg.prefix}/{device_id}"
        self.availability = f"{self.base}/availability"
        self.connected = threading.Event()
        self.reconnects = -1  # the first connect is not a reconnect
        self.predictions_sent = self.predictions_dropped = 0
        self.alerts_acked = 0
        self.commands_rejected = 0
        self.commands_ignored = 0  # retained commands: a config is not overridden by a stale retained message
        self.trouble = BrokerTrouble(f"{self.host}:{self.port}")
        self.delivery = "unverified"  # "ok" once a publish came back, "failing" once one did not
        self.probe_topic = f"{self.base}/probe"
        self._lock = threading.Lock()
        self._alert: tuple[str, str, float] | None = None  # (spool id, payload, sent): one in flight keeps order
        self._probe: tuple[str, float] | None = None  # (token, sent)
        self._next_probe = 0.0
        self._said_failing = 0.0
        self._retained: dict[str, str] = {}  # topic -> payload, re-published on reconnect
        self._connected_at = 0.0
        self._short: deque[float] = deque(maxlen=TAKEOVER_COUNT)  # when the broker closed young connections
        self.client_id = self.advanced.client_id or f"tta-agent-{self.device_id}-{uuid.uuid4().hex[:8]}"
        self.client = self._client(password)

    def _client(self, password: str | None) -> paho.Client:
        cfg = self.cfg
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv311)
        client.will_set(self.availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(self.advanced.max_queued)
        client.max_inflight_messages_set(20)
        if cfg.username:
            client.username_pw_set(cfg.username, password)
        if cfg.tls:
            client.tls_set(ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                           certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                           keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                           cert_reqs=ssl.CERT_NONE if cfg.tls.insecure else ssl.CERT_REQUIRED)
            client.tls_insecure_set(cfg.tls.insecure)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.enable_logger(logging.getLogger(PAHO_LOGGER))
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- connection -------------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.advanced.keepalive_s)
        self.client.loop_start()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Publish offline, give queued alerts a chance to leave, disconnect."""
        if self.connected.is_set():
            self._flush(flush_timeout)
            info = self.client.publish(self.availability, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(2.0, flush_timeout))
            except (RuntimeError, ValueError):
                pass
            self.client.disconnect()
        stopper = threading.Thread(target=self.client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(NETWORK_STOP_WAIT_S)
        if stopper.is_alive():  # its thread is a daemon thread: the process still exits
            log.warning("the MQTT network thread did not stop within %.0f s; leaving it behind",
                        NETWORK_STOP_WAIT_S)

    def _flush(self, timeout: float) -> None:
        done = threading.Event()
        deadline = threading.Timer(timeout, done.set)
        deadline.start()
        try:
            while not done.is_set() and len(self.spool) and self.connected.is_set() and self.delivery != "failing":
                done.wait(0.05)
        finally:
            deadline.cancel()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.trouble.failed(f"refused the connection: {reason_code}")
            return
        self.trouble.connected()
        self.reconnects += 1
        self._connected_at = time.monotonic()
        log.info("connected to %s:%s", self.host, self.port)
        # subscriptions first: the broker handles them before the publishes that follow, so those come back
        client.subscribe([(f"{self.base}/+/drift", 1), (self.probe_topic, 1)])
        for camera in self.cameras:
            for kind in COMMANDS:
                client.subscribe(f"{self.base}/{camera}/{kind}/set", qos=1)
        if self.cfg.homeassistant.enabled:
            client.subscribe(f"{self.advanced.discovery_prefix}/status", qos=1)
        client.publish(self.availability, "online", qos=1, retain=True)
        for topic, payload in list(self._retained.items()):
            client.publish(topic, payload, qos=1, retain=True)
        if self.cfg.homeassistant.enabled:
            self._publish_discovery()
        with self._lock:
            self._alert, self._probe, self._next_probe = None, None, 0.0  # resend from the head: at-least-once
            self._send_probe(time.monotonic())
        self.connected.set()
        self._pump()

    def _on_connect_fail(self, client, userdata):
        # paho calls this inside its `except OSError`, so the exception it caught is the reason
        self.trouble.failed(_reason(sys.exc_info()[1], self.cfg.tls is not None))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was_connected = self.connected.is_set()
        self.connected.clear()
        if reason_code.value != 0 and was_connected:
            log.warning("disconnected from %s:%s (%s); reconnecting", self.host, self.port, reason_code)
            now = time.monotonic()
            if now - self._connected_at < SHORT_CONNECTION_S:
                self._short.append(now)
            if self.taken_over:
                self.trouble.failed(self._takeover_reason())
            else:
                self.trouble.failed(f"connection lost ({reason_code})")

    @property
    def taken_over(self) -> bool:
        """The broker keeps closing young connections: MQTT 3.1.1's way of saying that another client connected
        with this client id (each new connection of either client closes the other's)."""
        return len(self._short) == TAKEOVER_COUNT and time.monotonic() - self._short[0] < TAKEOVER_WINDOW_S

    def _takeover_reason(self) -> str:
        return (f"closed this agent's connection {TAKEOVER_COUNT} times within {TAKEOVER_WINDOW_S:.0f} s, each "
                f"soon after accepting it: another client is most likely connected with the same client id "
                f"{self.client_id!r}; give each box its own advanced.mqtt.client_id, or leave it unset")

    @property
    def problem(self) -> str | None:
        """Why MQTT is degraded while connected, or None."""
        if self.taken_over:
            return f"mqtt: the broker {self.trouble.where} {self._takeover_reason()}"
        if self.delivery == "failing":
            return f"mqtt: the broker {self.trouble.where} does not deliver what this agent publishes ({self._acl})"
        return None

    # -- delivery, read back -----------------------------------------------------------------
    @property
    def _acl(self) -> str:
        user = f"user {self.cfg.username!r}" if self.cfg.username else "this agent's user"
        return f"check its ACL: {user} must be allowed to write and read {self.base}/#"

    def _send_probe(self, now: float) -> None:
        token = uuid.uuid4().hex
        self.client.publish(self.probe_topic, token, qos=1)
        self._probe = (token, now)
        self._next_probe = now + self.advanced.verify_every_s

    def _came_back(self) -> None:
        """Something this agent published was delivered back to it (called under the lock)."""
        if self.delivery == "failing":
            log.warning("broker %s delivers what this agent publishes again; %d alert(s) in the spool go out",
                        self.trouble.where, len(self.spool))
        self.delivery = "ok"

    def check_delivery(self) -> None:
        """From the main loop: a probe when one is due, and `failing` for what did not come back in time."""
        if not self.connected.is_set():
            return
        now = time.monotonic()
        with self._lock:
            late = [sent for sent in (self._probe and self._probe[1], self._alert and self._alert[2])
                    if sent and now - sent > VERIFY_TIMEOUT_S]
            if late:
                if self.delivery != "failing" or now - self._said_failing >= TROUBLE_REPEAT_S:
                    log.error("broker %s acknowledges what this agent publishes but does not deliver it: messages "
                              "on %s/# are being dropped; %s (configs/mosquitto-acl.conf). Drift alerts stay in "
                              "the spool (%d) until delivery works", self.trouble.where, self.base, self._acl,
                              len(self.spool))
                    self._said_failing = now
                self.delivery = "failing"
                if self._probe and now - self._probe[1] > VERIFY_TIMEOUT_S:
                    self._probe = None
                    self._next_probe = now + VERIFY_TIMEOUT_S
            if self._probe is None and now >= self._next_probe:
                self._send_probe(now)

    # -- alerts through the spool ------------------------------------------------------------
    def publish_drift(self, camera: str, event: dict) -> None:
        self.spool.put(f"{self.base}/{camera}/drift", event)
        self._pump()

    def _pump(self) -> None:
        with self._lock:
            if self._alert or not self.connected.is_set():
                return
            head = self.spool.peek()
            if head is None:
                return
            message_id, topic, payload = head
            text = json.dumps(payload)
            info = self.client.publish(topic, text, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS or info.rc == paho.MQTT_ERR_NO_CONN:
                self._alert = (message_id, text, time.monotonic())

    def _echo(self, topic: str, payload: bytes) -> None:
        """One of this agent's own alerts or probes, delivered back: the alert leaves the spool."""
        delivered = False
        with self._lock:
            text = payload.decode("utf-8", "replace")
            if topic == self.probe_topic:
                if self._probe and self._probe[0] == text:
                    self._probe = None
                    self._came_back()
                    if self._alert and time.monotonic() - self._alert[2] > VERIFY_TIMEOUT_S:
                        self._alert, delivered = None, True  # lost on the way while delivery failed: again
            elif self._alert and self._alert[1] == text:
                self.spool.remove(self._alert[0])
                self.alerts_acked += 1
                self._alert, delivered = None, True
                self._came_back()
        if delivered:
            self._pump()

    # -- predictions, state, stats -----------------------------------------------------------
    def publish_prediction(self, camera: str, payload: dict) -> None:
        if not self.connected.is_set():
            self.predictions_dropped += 1
            return
        info = self.client.publish(f"{self.base}/{camera}/prediction", json.dumps(payload), qos=0)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self.predictions_sent += 1
        else:
            self.predictions_dropped += 1

    def publish_retained(self, subtopic: str, payload: dict) -> None:
        topic = f"{self.base}/{subtopic}"
        text = json.dumps(payload)
        self._retained[topic] = text
        if self.connected.is_set():
            self.client.publish(topic, text, qos=1, retain=True)

    @property
    def queue_depth(self) -> int:
        return len(self.client._out_messages)

    # -- commands in -------------------------------------------------------------------------
    def _on_message(self, client, userdata, message):
        try:
            if message.topic == self.probe_topic or message.topic.endswith("/drift"):
                self._echo(message.topic, message.payload)
                return
            if self.cfg.homeassistant.enabled and message.topic == f"{self.advanced.discovery_prefix}/status":
                if message.payload == b"online":
                    self._publish_discovery()
                return
            if message.retain or not message.payload:
                self._ignore(message)
                return
            self.commands.put_nowait(self.parse_command(message.topic, message.payload))
        except (ValueError, queue.Full) as exc:
            self.commands_rejected += 1
            log.warning("command rejected on %r: %s", message.topic[:200], exc)

    def _ignore(self, message) -> None:
        """A retained command would override the config at every start; an empty one clears it."""
        if not message.payload:
            log.debug("empty message on %r (a retained command being cleared): nothing to do", message.topic[:200])
            return
        self.commands_ignored += 1
        log.warning("retained command on %r ignored: commands act once, publish them without the retain flag; "
                    "clear it with: mosquitto_pub -r -n -t '%s'", message.topic[:200], message.topic[:200])

    def parse_command(self, topic: str, payload: bytes) -> Command:
        """Strict: a known camera, a known command, a known value; nothing else."""
        parts = topic.removeprefix(self.base + "/").split("/")
        if len(parts) != 3 or parts[2] != "set" or parts[1] not in COMMANDS:
            raise ValueError("unknown command topic")
        camera, kind = parts[0], parts[1]
        if camera not in self.cameras:
            raise ValueError(f"unknown camera {camera[:64]!r}")
        if len(payload) > MAX_COMMAND_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes (at most {MAX_COMMAND_BYTES})")
        try:
            value = payload.decode("utf-8").strip().lower()
        except UnicodeDecodeError:
            raise ValueError("payload is not UTF-8 text") from None
        if value not in COMMANDS[kind]:
            raise ValueError(f"{kind} takes one of {', '.join(COMMANDS[kind])}, got {value[:32]!r}")
        return Command(camera, kind, value)

    def _publish_discovery(self) -> None:
        """Home Assistant MQTT discovery per camera: a class sensor, a drift binary sensor and a source
        connectivity sensor (with the camera's stats, `last_error` among them, as attributes). The topics carry
        the device id as Home Assistant's node id, so one ACL pattern (`homeassistant/+/%u/#`) covers every box."""
        prefix = self.advanced.discovery_prefix
        device = {"identifiers": [f"tta-agent-{self.device_id}"], "name": f"tta-agent {self.device_id}",
                  "manufacturer": "tta-agent", "model": "streaming test-time adaptation"}
        for camera in sorted(self.cameras):
            uid = f"tta_{self.device_id}_{camera}"
            node = f"{self.device_id}/{camera}"
            configs = {
                f"{prefix}/sensor/{node}_class/config": {
                    "name": f"{camera} class", "unique_id": f"{uid}_class",
                    "state_topic": f"{self.base}/{camera}/class",
                    "value_template": "{{ value_json.label }}",
                },
                f"{prefix}/binary_sensor/{node}_drift/config": {
                    "name": f"{camera} drift", "unique_id": f"{uid}_drift", "device_class": "problem",
                    "state_topic": f"{self.base}/{camera}/drift/state",
                    "value_template": "{{ 'ON' if value_json.active else 'OFF' }}",
                },
                f"{prefix}/binary_sensor/{node}_source/config": {
                    "name": f"{camera} source", "unique_id": f"{uid}_source", "device_class": "connectivity",
                    "state_topic": f"{self.base}/stats",
                    "value_template": f"{{{{ 'ON' if value_json.cameras['{camera}'].connected else 'OFF' }}}}",
                    "json_attributes_topic": f"{self.base}/stats",
                    "json_attributes_template": f"{{{{ value_json.cameras['{camera}'] | tojson }}}}",
                },
            }
            for topic, doc in configs.items():
                doc.update(availability_topic=self.availability, device=device)
                self.client.publish(topic, json.dumps(doc), qos=1, retain=True)
