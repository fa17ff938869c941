"""The floor of a refusal on this machine: a raw ASGI app under uvicorn (httptools, uvloop, no
access log, as r3-serve runs) that reads each request's body, parses it with orjson and answers
429 with `Retry-After`, nothing else. `r3-loadtest --burst N --floor` sends the same burst to it
and prints its figures beside r3's: how far r3's refusals are from what this machine and client
allow.

    python -m r3_tools.bare_refuser [--host 127.0.0.1] [--port 8001]
"""

from __future__ import annotations

import argparse
import contextlib

import orjson
from starlette.types import Message, Receive, Scope, Send

ANSWER = b'{"detail":"queue full (bare refuser)"}'
HEADERS = [(b"content-type", b"application/json"), (b"retry-after", b"1"),
           (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    message: Message = {"more_body": True}
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    with contextlib.suppress(orjson.JSONDecodeError):
        orjson.loads(b"".join(chunks))
    await send({"type": "http.response.start", "status": 429, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m r3_tools.bare_refuser",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, lifespan="off", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
