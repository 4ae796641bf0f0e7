"""What the daemon keeps of each camera in `state.dir`, and how it comes back after a restart.

    <camera>.state.npz    the adaptation checkpoint (agent/state.py's layout)
    <camera>.drift.json   the drift detector's reference and open episode, so an episode's `end` still comes

Every file is checked against this version and this model when it is read; one that does not fit
(another version's, another model's, a damaged one) is moved aside with a timestamp and a warning,
and the camera starts fresh. A write that fails (a full disk) is counted, said once, and retried
at the next checkpoint: the daemon keeps running.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .files import WriteTrouble, move_aside, write_atomic
from .pipeline import CameraPipeline
from .state import StateError

log = logging.getLogger(__name__)
DRIFT_FORMAT = 1


class StateFolder:
    def __init__(self, folder: Path, trouble: WriteTrouble):
        self.folder = folder
        self.trouble = trouble

    def checkpoint_path(self, camera: str) -> Path:
        return self.folder / f"{camera}.state.npz"

    def drift_path(self, camera: str) -> Path:
        return self.folder / f"{camera}.drift.json"

    # -- reading, at start ----------------------------------------------------------------------
    def resume(self, camera: str, pipeline: CameraPipeline) -> str | None:
        """Load what was saved of the camera into its pipeline; the open episode's start time, if any."""
        path = self.checkpoint_path(camera)
        if path.exists():
            try:
                pipeline.session.load(path)
                log.info("camera %s resumes adaptation from %s (%d frames, %.0f s old)", camera, path,
                         pipeline.session.frames, time.time() - path.stat().st_mtime)
            except StateError as exc:
                self._reject(camera, path, exc, "adaptation starts from the model's source statistics")
        path = self.drift_path(camera)
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or saved.get("format", DRIFT_FORMAT) != DRIFT_FORMAT:
                raise ValueError(f"not a drift state of format {DRIFT_FORMAT}")
            if saved["detector"] is not None:
                pipeline.drift.restore(saved["detector"])
            since = saved["since"] if pipeline.drift.active else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._reject(camera, path, exc, "the drift detector learns the camera again")
            return None
        if pipeline.drift.active:
            log.info("camera %s: drift episode %s carried over from the last run", camera, pipeline.drift.episode)
        return since

    def _reject(self, camera: str, path: Path, exc: Exception, then: str) -> None:
        try:
            where = f"moved aside to {move_aside(path).name}"
        except OSError as error:
            where = f"cannot be moved aside ({error.strerror or error})"
        log.warning("camera %s: %s does not fit this version and model (%s); %s; %s", camera, path, exc, where,
                    then)

    # -- writing --------------------------------------------------------------------------------
    def save_drift(self, camera: str, pipeline: CameraPipeline, since: str | None) -> bool:
        doc = {"format": DRIFT_FORMAT, "detector": pipeline.drift.state(), "since": since}
        return self._write(f"drift state of camera {camera}", self.drift_path(camera),
                           lambda path: write_atomic(path, lambda f: f.write(json.dumps(doc).encode())))

    def checkpoint(self, camera: str, pipeline: CameraPipeline, since: str | None) -> None:
        self._write(f"checkpoint of camera {camera}", self.checkpoint_path(camera), pipeline.session.save)
        self.save_drift(camera, pipeline, since)

    def _write(self, what: str, path: Path, write) -> bool:
        try:
            write(path)
        except OSError as exc:
            self.trouble.failed(what, path, exc)
            return False
        self.trouble.succeeded(what)
        return True
