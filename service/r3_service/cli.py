"""`r3-serve`: run the reward service with uvicorn."""

from __future__ import annotations

import argparse
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from r3_service.api.app import create_app
from r3_service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="r3-serve", description="Serve R3 rewards over HTTP. Scoring settings come from R3_* "
                                     "environment variables (see the README).")
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
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    DrainingServer(config, app).run()


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, first mark the app as draining (503 for new requests, /readyz not
    ready), then let uvicorn stop listening and wait for in-flight requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
