"""`r3-serve`: run the reward service with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

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
    # One process owns the model; concurrency comes from the event loop, not from workers.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=level,
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
