"""An embedded MQTT broker (amqtt) for the demo on machines without one. Needs the `demo` extra."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """amqtt on 127.0.0.1 in a thread of its own; anonymous, for local demos only."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            raise RuntimeError(f"embedded MQTT broker did not start on port {self.port}: {self._error}")
        log.info("embedded MQTT broker on 127.0.0.1:%d", self.port)
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        async def serve():
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            broker = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })
            await broker.start()
            self._ready.set()
            await self._stopped.wait()
            await broker.shutdown()

        try:
            asyncio.run(serve())
        except Exception as exc:  # report start failures to start()
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
