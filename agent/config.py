"""The agent's YAML configuration, validated in one place: the keys a user sets at the top level, the
rest under `advanced:` (docs/configuration.md is generated from this schema).

Unknown keys are rejected and every error names its key path and what was expected,
so a bad config stops start-up (and `tta-agent validate-config` in ExecStartPre) with a
message a user can act on. configs/*.yaml are working examples.
"""
from __future__ import annotations

import difflib
import os
import re
import socket
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .gate import MARGIN
from .model.cadence import REBAKE_DIVERGENCE, STATISTICS_EVERY
from .vocabulary import ADAPTATION_MODES, BACKENDS, DEVICES, LAME_MODES, METHODS

MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """Every problem of a config file, one per line, each with its key path."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def within(self, path: Path) -> ConfigError:
        """The same problems, each line naming the file."""
        return ConfigError([f"{path}: {p}" for p in self.problems])


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    path: Path = Field(description="the adaptive .onnx file from tta-export")
    device: Literal[DEVICES] = Field("auto", description="auto: a GPU when onnxruntime offers one, "
                                                                      "else the CPU (and back to it if the GPU fails)")


class AdvancedModelConfig(Section):
    backend: Literal[BACKENDS] = Field(
        "auto", description="auto: onnxruntime, or torch when cuda is asked for and only torch reaches the GPU")
    threads: int | None = Field(None, ge=1, le=256, description="intra-op threads; default: physical cores")


def _yaml_switch(value):
    """YAML 1.1 reads a bare on/off as a boolean; take it as the word the user wrote."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class GateConfig(Section):
    enabled: bool = Field(True, description="method unmix: adapt only as far as frames leave the model's clean shift "
                                            "reference")
    low: float = Field(0.5, ge=-100, le=100, description="smoothed standardised shift at which adaptation starts")
    high: float = Field(1.5, ge=-100, le=100, description="... and reaches full strength (high - low above the start)")
    margin: float = Field(0.5, ge=0, le=100, description="start at least this far above the clean calibration peak")
    smoothing: float = Field(0.05, gt=0, le=1, description="per-frame weight of the newest shift")
    shadow_every: int = Field(4, ge=1, le=10_000, description="unadapted pass every N frames while adapting")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        return self


class GuardConfig(Section):
    enabled: bool = Field(True, description="reset and pause adaptation when its predictions collapse")
    window: int = Field(50, ge=10, le=100_000, description="frames with an unadapted pass (every raw_every-th) "
                                                           "compared at a time")
    margin: float = Field(MARGIN, gt=0, le=100, description="fire when the adapted answers are further from the "
                                                           "camera's usual answers than the unadapted ones on the "
                                                           "same frames by more than this (KL, nats)")
    hold: int = Field(500, ge=0, le=10_000_000, description="frames without adaptation after firing")


class AdaptationConfig(Section):
    mode: Literal[ADAPTATION_MODES] = Field("on", description="on: adapt and learn; frozen: adapt with what was "
                                                             "learned; off: the unadapted model")
    _switch = field_validator("mode", mode="before")(_yaml_switch)


class FoldedConfig(Section):
    """Keys of folded-layout models only; a graph-layout model refuses them at start."""
    statistics_every: int = Field(STATISTICS_EVERY, ge=1, le=100_000,
                                  description="measure statistics every N frames: unadapted frames always, adapted "
                                              "ones once a drift episode has settled (the camera anchor) or always "
                                              "(unmix)")
    rebake_divergence: float | None = Field(
        None, ge=0, le=100, description="rebuild the baked normalisation once a measurement has moved what the "
        "frames need this far from it (mean KL per layer); default " + ", ".join(
            f"{v} for {k}" for k, v in REBAKE_DIVERGENCE.items()))


class AdvancedAdaptationConfig(Section):
    method: Literal[METHODS] = Field(
        "auto", description="anchor: folded-layout models normalise with the change of conditions since the "
                            "camera's own usual frames, during drift episodes; unmix: robust UnMix-TNS under the "
                            "shift gate; auto: anchor for folded models, unmix for graph models")
    seed: int = Field(0, ge=0, description="seed of the initial components")
    raw_every: int = Field(30, ge=0, description="run the unadapted model every N frames (0: never)")
    gate: GateConfig = GateConfig()
    guard: GuardConfig = GuardConfig()
    folded: FoldedConfig = FoldedConfig()


class LameConfig(Section):
    mode: Literal[LAME_MODES] = Field("auto", description="LAME output correction; auto: while predictions "
                                                                  "come in runs (label-correlated), on a fixed "
                                                                  "camera only for the frames it adapts")
    _switch = field_validator("mode", mode="before")(_yaml_switch)


class AdvancedLameConfig(Section):
    window: int = Field(16, ge=1, le=1024, description="frames LAME corrects together")
    affinity: Literal["knn", "rbf"] = Field("knn", description="how frames in the window are related")
    knn: int = Field(3, ge=1, le=1024, description="neighbours per frame (knn affinity)")


class DriftConfig(Section):
    warmup: int = Field(100, ge=2, le=1_000_000, description="frames that learn the camera's usual imaging statistics")
    threshold: float = Field(6.0, gt=0, le=1e6,
                             description="score (smoothed spreads from usual) that starts an episode")
    end_level: float = Field(3.0, ge=0, le=1e6, description="an episode ends once the score stays under this...")
    end_frames: int = Field(30, ge=1, le=1_000_000, description="...for this many frames")
    update_every: int = Field(100, ge=1, le=1_000_000, description="an `update` event every N frames while drifting")
    min_spread: float = Field(0.03, gt=0, le=10, description="smallest spread of a log statistic (a still camera's "
                                                             "passers-by stay under threshold x this)")
    view_similarity: float = Field(0.6, ge=-1, le=1, description="thumbnail correlation above which a frame shows "
                                                                 "the reference view")

    @model_validator(mode="after")
    def _ordered(self):
        if self.threshold <= self.end_level:
            raise ValueError(f"threshold ({self.threshold}) must be above end_level ({self.end_level})")
        return self


class ReplayConfig(Section):
    paced: bool = Field(True, description="video files: at their own frame rate (false: as fast as the model goes)")
    loop: bool = Field(False, description="video files: start again at the end")
    start: int = Field(0, ge=0, description="video files: first frame")
    end: int | None = Field(None, ge=1, description="video files: stop before this frame")


class CameraConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="letters, digits, _ and - (used in topics)")
    source: str = Field(min_length=1, max_length=4096, description="camera index, stream URL or video file")
    replay: ReplayConfig = ReplayConfig()


class SourcesConfig(Section):
    stall_timeout_s: float = Field(5.0, gt=0, le=3600, description="reopen a live camera when no frame came for "
                                                                   "this long")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="backoff ceiling between reopen attempts")


class TlsConfig(Section):
    ca: Path | None = Field(None, description="CA bundle that signed the broker's certificate (null: the system's)")
    cert: Path | None = Field(None, description="client certificate (with key)")
    key: Path | None = Field(None, description="client key (with cert)")
    insecure: bool = Field(False, description="skip certificate verification (never in production)")

    @model_validator(mode="after")
    def _cert_with_key(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self


class HomeAssistantConfig(Section):
    enabled: bool = Field(False, description="announce sensors to Home Assistant (MQTT discovery)")


class MqttConfig(Section):
    host: str | None = Field("127.0.0.1", description="broker host; null starts the embedded broker (demo)")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual for TLS)")
    prefix: str = Field("tta", pattern=r"^[A-Za-z0-9_/-]{1,128}$", description="topics are `<prefix>/<device_id>/...`")
    username: str | None = Field(None, description="broker user (one password source below)")
    password_file: Path | None = Field(None, description="file holding the password")
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_credential: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,128}$",
                                            description="systemd credential name (LoadCredential=)")
    tls: TlsConfig | None = None
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()

    @model_validator(mode="after")
    def _one_password_source(self):
        given = [k for k in ("password_file", "password_env", "password_credential") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one password source, not {' and '.join(given)}")
        return self


class AdvancedMqttConfig(Section):
    client_id: str | None = Field(None, max_length=128, description="default: `tta-agent-<device_id>-<random>`")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive; the broker publishes the will after "
                                                            "1.5x this")
    predictions_every: int = Field(1, ge=1, description="publish every Nth frame's prediction")
    top_k: int = Field(3, ge=1, le=100, description="classes in each prediction")
    stats_interval_s: float = Field(10.0, ge=0.5, le=3600, description="seconds between stats messages")
    verify_every_s: float = Field(60.0, ge=1, le=86400, description="seconds between checks that what the agent "
                                                                    "publishes comes back from the broker (each "
                                                                    "alert is checked as it goes)")
    max_queued: int = Field(1000, ge=10, le=1_000_000, description="paho's outgoing queue bound")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_/-]{1,128}$",
                                  description="Home Assistant's discovery topic prefix")


class StateConfig(Section):
    dir: Path = Field(Path("/var/lib/tta-agent"), description="checkpoints and the alert spool")


class AdvancedStateConfig(Section):
    checkpoint_every_s: float = Field(60.0, ge=1, le=86400, description="seconds between checkpoints of what "
                                                                        "each camera learned")
    spool_max_events: int = Field(10_000, ge=10, le=10_000_000, description="alerts kept on disk during a broker "
                                                                            "outage; past this the oldest go")


class HttpConfig(Section):
    enabled: bool = Field(False, description="serve /healthz and /metrics (Prometheus) over HTTP")
    port: int = Field(9464, ge=1, le=65535, description="port of /healthz and /metrics")


class AdvancedHttpConfig(Section):
    host: str = Field("127.0.0.1", min_length=1, max_length=255, description="address to bind; 0.0.0.0 for all")
    stall_s: float = Field(30.0, gt=0, le=3600, description="/healthz fails once the main loop has not come "
                                                            "round for this long")


class AdvancedConfig(Section):
    """Most users never set these: what the benchmarks chose, and knobs for unusual boxes."""
    model: AdvancedModelConfig = AdvancedModelConfig()
    adaptation: AdvancedAdaptationConfig = AdvancedAdaptationConfig()
    lame: AdvancedLameConfig = AdvancedLameConfig()
    drift: DriftConfig = DriftConfig()
    sources: SourcesConfig = SourcesConfig()
    mqtt: AdvancedMqttConfig = AdvancedMqttConfig()
    state: AdvancedStateConfig = AdvancedStateConfig()
    http: AdvancedHttpConfig = AdvancedHttpConfig()


class Config(Section):
    device_id: str = Field(default_factory=lambda: re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64],
                           pattern=r"^[A-Za-z0-9_-]{1,64}$", description="this box in topics and client ids")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug: a line per frame "
                                                                                     "and paho's own lines")
    model: ModelConfig
    adaptation: AdaptationConfig = AdaptationConfig()
    lame: LameConfig = LameConfig()
    cameras: list[CameraConfig] = Field(min_length=1, max_length=64)
    mqtt: MqttConfig = MqttConfig()
    state: StateConfig = StateConfig()
    http: HttpConfig = HttpConfig()
    exit_when_done: bool = Field(False, description="stop once every file source has ended (replay runs)")
    advanced: AdvancedConfig = Field(AdvancedConfig(), description="most users never set these")

    @field_validator("cameras")
    @classmethod
    def _unique_names(cls, cameras):
        names = [c.name for c in cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        return cameras


def layout_problem(config: Config, layout: str, model: Path) -> str | None:
    """`advanced.adaptation.folded` set for a model of another layout: what to tell the user, else None."""
    if layout == "folded" or "folded" not in config.advanced.adaptation.model_fields_set:
        return None
    return (f"advanced.adaptation.folded: these keys apply to folded-layout models; {model} is a {layout}-layout "
            "model (remove the section, or export with tta-export --layout folded)")


def _key(part) -> str:
    """A key as the user can see it: quoted unless a plain word (keys can hold ':', '.', control characters)."""
    return str(part) if isinstance(part, int) or re.fullmatch(r"[A-Za-z0-9_-]+", part) else repr(part)


# the schema's patterns in words
_FORMS = {r"^[A-Za-z0-9_-]{1,64}$": "1 to 64 letters, digits, _ and -",
          r"^[A-Za-z0-9_/-]{1,128}$": "1 to 128 letters, digits, _, - and /",
          r"^[A-Za-z0-9_.-]{1,128}$": "1 to 128 letters, digits, _, . and -"}
# what a value must be, by pydantic's error type, in the user's words ({ctx} from the error)
_MUST = {
    "greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
    "greater_than": "must be above {gt}", "less_than": "must be below {lt}",
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number", "float_parsing": "must be a number", "float_type": "must be a number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false", "string_type": "must be text",
    "list_type": "must be a list", "model_type": "must be a section of keys", "dict_type": "must be a section of keys",
    "model_attributes_type": "must be a section of keys", "path_type": "must be a file path",
    "string_too_long": "must be at most {max_length} characters", "string_too_short": "must not be empty",
    "too_short": "needs at least {min_length} item(s)", "too_long": "takes at most {max_length} item(s)",
}


def _format(error: ValidationError) -> list[str]:
    """One line per problem: the key path, then what is wrong in words (no regexes, no pydantic jargon)."""
    lines = []
    for e in error.errors():
        loc = tuple(e["loc"])
        path = ".".join(_key(p) for p in loc) or "(top level)"
        got = f" (got {e.get('input')!r:.60})"
        kind, ctx = e["type"], e.get("ctx", {})
        if kind == "extra_forbidden":
            lines.append(f"{path}: unknown key{_moved(loc)}")
        elif kind == "missing":
            lines.append(f"{path}: required key missing")
        elif kind == "literal_error":
            field = _field(loc)
            choices = get_args(field.annotation) if field else ()
            lines.append(f"{path}: must be one of {', '.join(map(str, choices)) or ctx.get('expected')}{got}")
        elif kind == "string_pattern_mismatch":
            lines.append(f"{path}: must be {_FORMS.get(ctx.get('pattern'), 'of another form')}{got}")
        elif kind == "value_error":
            lines.append(f"{path}: {str(ctx.get('error', e['msg'])).removeprefix('Value error, ')}")
        elif kind in _MUST:
            lines.append(f"{path}: {_MUST[kind].format(**ctx)}{got}")
        else:
            lines.append(f"{path}: {e['msg']}{got}")
    return lines


def _field(loc: tuple):
    """The schema's field at a key path (list indices skipped), or None."""
    model, field = Config, None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        args = getattr(field.annotation, "__args__", None) or ()
        model = next((a for a in (field.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
    return field


def _moved(loc: tuple) -> str:
    """For an unknown key that the schema has elsewhere: where it belongs."""
    names = tuple(p for p in loc if not isinstance(p, int))
    if names[:1] == ("advanced",) and _field(names[1:]):
        return f"; this key is set at the top level: {'.'.join(names[1:])}"
    if names[:1] != ("advanced",) and _field(("advanced", *names)):
        return f"; this key is set under advanced: as advanced.{'.'.join(names)}"
    parent = _field(loc[:-1]) if len(loc) > 1 else None
    model = Config if parent is None else next((a for a in (parent.annotation, *getattr(
        parent.annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    close = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def parse_config(doc: object, base: Path | None = None) -> Config:
    """Validate a parsed YAML document; relative paths are taken from `base` (the config's folder)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"(top level): expected a mapping of keys, got {type(doc).__name__}")
    try:
        config = Config.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    return _resolve(config, base) if base else config


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`key.path=value` settings (tta-agent replay --set), the values read as YAML."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: an override is KEY=VALUE, e.g. adaptation.mode=off")
        try:
            overrides[key] = yaml.load(text, Loader=_NoAliasLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: the value {text!r} is not YAML: {_yaml_problem(exc)}") from None
    return overrides


def apply_overrides(doc: dict, overrides: dict[str, object]) -> dict:
    """Values by key path (`advanced.adaptation.gate.enabled`) laid over a parsed document, which is changed."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = doc
        for name in parents:
            child = node.get(name) if isinstance(node, dict) else None
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {name} is not a section")
            node = child
        node[leaf] = value
    return doc


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """The config file, with values by key path (apply_overrides) laid over it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a config")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        doc, twice = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if twice:
        raise ConfigError([f"{path}: {line}" for line in twice])
    try:
        if overrides:
            doc = apply_overrides(doc if isinstance(doc, dict) else {}, overrides)
        return parse_config(doc, path.parent)
    except ConfigError as exc:
        raise exc.within(path) from None


def _parse_yaml(text: str) -> tuple[object, list[str]]:
    """The document, and the keys written twice in it (when any, the document is not built)."""
    loader = _NoAliasLoader(text)
    try:
        node = loader.get_single_node()
        twice = _written_twice(node)
        return (None if twice or node is None else loader.construct_document(node)), twice
    finally:
        loader.dispose()


def _written_twice(node, path: tuple[str, ...] = ()) -> list[str]:
    """Keys written twice in one mapping (YAML keeps the last silently: an appended `mqtt:` section would drop
    the first one's host, user and TLS)."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            line = key.start_mark.line + 1
            if name in lines:
                problems.append(f"{'.'.join((*path, name))}: written twice (lines {lines[name]} and {line}); "
                                "YAML would keep only the second: merge them into one")
            else:
                lines[name] = line
            problems += _written_twice(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _written_twice(item, (*path, str(i)))
    return problems


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a config has no use for them, and they make 'billion laughs' bombs."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in a config", event.start_mark)
        return super().compose_node(parent, index)


def _resolve(config: Config, base: Path) -> Config:
    def absolute(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    cameras = []
    for cam in config.cameras:
        source = cam.source
        if not source.isdigit() and "://" not in source and not os.path.isabs(source):
            source = str((base / source).resolve())
        cameras.append(cam.model_copy(update={"source": source}))
    mqtt = config.mqtt
    tls = mqtt.tls and mqtt.tls.model_copy(update={k: absolute(getattr(mqtt.tls, k)) for k in ("ca", "cert", "key")})
    mqtt = mqtt.model_copy(update={"password_file": absolute(mqtt.password_file), "tls": tls})
    return config.model_copy(update={
        "model": config.model.model_copy(update={"path": absolute(config.model.path)}),
        "cameras": cameras,
        "mqtt": mqtt,
        "state": config.state.model_copy(update={"dir": absolute(config.state.dir)}),
    })


def read_password(mqtt: MqttConfig) -> str | None:
    """From a file, a systemd credential ($CREDENTIALS_DIRECTORY/<name>) or the environment; never logged."""
    path = mqtt.password_file
    if mqtt.password_credential:
        if "CREDENTIALS_DIRECTORY" not in os.environ:
            raise ConfigError("mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set (LoadCredential= missing?)")
        path = Path(os.environ["CREDENTIALS_DIRECTORY"]) / mqtt.password_credential
    if path:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {path}: {exc.strerror}") from None
    if mqtt.password_env:
        if mqtt.password_env not in os.environ:
            raise ConfigError(f"mqtt.password_env: environment variable {mqtt.password_env} is not set")
        return os.environ[mqtt.password_env]
    return None
