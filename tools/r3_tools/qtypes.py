"""`r3-qtypes load | classify | train | eval`: the query-type store and the query-type classifier
in one command. `r3-qtype train|eval`, the old name, stays as an alias for one release."""

from __future__ import annotations

import argparse
import os
import sys

from r3_tools import qtype_eval, store_admin

STORE_COMMANDS = ("load", "classify")


def parser(prog: str = "r3-qtypes") -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog=prog, description="Query types: load or classify a dataset into the store; train or "
                               "evaluate the query-type classifier.")
    commands = root.add_subparsers(dest="command", required=True)
    store_admin.add_commands(commands)
    qtype_eval.add_commands(commands)
    for name in ("classify", "eval"):
        add_llm_arguments(commands.choices[name])
    return root


def add_llm_arguments(command: argparse.ArgumentParser) -> None:
    """The `llm` kind's endpoint, for the commands that can build one."""
    command.add_argument("--llm-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1")
    command.add_argument("--llm-model", help="model name sent to the endpoint")
    command.add_argument("--llm-api-key", default=os.environ.get("R3_QTYPE_LLM_API_KEY"),
                         help="default: $R3_QTYPE_LLM_API_KEY")
    command.add_argument("--timeout-s", type=float, default=10.0, help="per request to the endpoint")


def main(argv: list[str] | None = None) -> int:
    root = parser()
    args = root.parse_args(argv)
    tool = store_admin if args.command in STORE_COMMANDS else qtype_eval
    return tool.run(args, root)


def deprecated_main(argv: list[str] | None = None) -> int:
    """`r3-qtype` (one letter apart from `r3-qtypes`), kept for one release."""
    print("r3-qtype is deprecated and will be removed in the next release: use r3-qtypes "
          "(same subcommands)", file=sys.stderr)
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
