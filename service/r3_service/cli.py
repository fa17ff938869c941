"""`r3-serve`: run the reward service with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from r3_service.api.app import create_app
from r3_service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="r3-serve", description="Serve R3 rewards over HTTP. Scoring settings come from R3_* "
                                     "environment variables (docs/reference/configuration.md).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    settings = Settings()
    level = args.log_level or settings.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # One process owns the model; concurrency comes from the event loop, not from workers.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level,
                            access_log=settings.access_log != "off",
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    if settings.access_log == "sampled":  # after uvicorn.Config, which configures its loggers
        logging.getLogger("uvicorn.access").addFilter(SampledRefusals())
    DrainingServer(config, app, settings.shutdown_timeout_s).run()


class SampledRefusals(logging.Filter):
    """uvicorn's access log with its 429s sampled (R3_ACCESS_LOG=sampled): the first of each second
    is logged and the rest counted; the next line logged is preceded by how many were left out.
    A burst of refusals then costs a log record each, not a formatted, written line."""

    def __init__(self) -> None:
        super().__init__()
        self.second, self.skipped = -1, 0

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's: client, method, path, HTTP version, status
        refusal = isinstance(args, tuple) and len(args) == 5 and args[4] == 429
        if refusal and int(record.created) == self.second:
            self.skipped += 1
            return False
        if self.skipped:
            logging.getLogger("r3_service").info("%d more 429 answers not in the access log "
                                                 "(R3_ACCESS_LOG=sampled)", self.skipped)
            self.skipped = 0
        if refusal:
            self.second = int(record.created)
        return True


DRAIN_GRACE_S = 0.5


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT starts a drain: new requests get 503 and /readyz turns 503 while
    the socket stays open, and uvicorn is told to stop once the requests in flight have finished
    (or after R3_SHUTDOWN_TIMEOUT_S). A second signal stops at once. A drained exit is exit 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.app.state.draining or self._loop is None:
            super().handle_exit(sig, frame)
        else:
            self.app.state.draining = True
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
        # uvicorn re-raises caught signals after a graceful stop, which turns a clean drain into
        # "killed by SIGTERM" (exit -15): a finished drain is a success.
        self._captured_signals.clear()

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.app.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Stop accepting first, and give connections already accepted time for their 503: closing
        # the socket and the connections at once would drop a request caught in between.
        for server in self.servers:
            server.close()
        await asyncio.sleep(DRAIN_GRACE_S)
        logging.getLogger("r3_service").info("drained (%d requests still in flight); stopping",
                                             self.app.state.in_flight)
        self.should_exit = True


if __name__ == "__main__":
    main()
