"""`r3-qtypes load | classify | train | eval`: the query-type store and the query-type classifier
in one command. `r3-qtype train|eval`, the old name, stays as an alias for one release."""

from __future__ import annotations

import argparse
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
    return root


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
