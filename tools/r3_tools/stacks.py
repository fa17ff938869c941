"""Where a sampled r3-serve spends its CPU: `python -m r3_tools.stacks PROFILE.txt` reads py-spy's
raw (collapsed) stacks (`py-spy record --format raw`, scripts/profile.sh) and prints each part's
share of the on-CPU samples, and the functions with the most samples of their own.

A stack counts for the first part, in the order below, that one of its frames belongs to: a sample
inside the model's forward pass is the forward pass even when the API called it. What is not the
forward pass is what issue 26 asks to cut."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# (part, pattern a frame "function (file:line)" matches), highest priority first.
PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("forward pass", re.compile(r"\.forward \(r3_service/models/|torch/nn/|transformers/models/")),
    ("tokenisation", re.compile(r"tokeniz|transformers/tokenization")),
    ("rule (features, guards)", re.compile(r"r3_service/rule/")),
    ("engine (queue, cache, resolution)", re.compile(r"r3_service/engine/")),
    ("store (Redis)", re.compile(r"redis/|r3_service/store/")),
    ("API (HTTP, JSON, validation)",
     re.compile(r"uvicorn/|starlette/|fastapi/|pydantic|json/|h11/|httptools")),
    ("event loop", re.compile(r"asyncio/")),
)
# Leaf frames of threads blocked in C (a queue, a condition, the event loop's select) that py-spy
# could not tell were idle: counted apart, not as work.
WAITING = re.compile(r"^(_worker \(concurrent/futures/thread\.py|Condition\.wait \(|Event\.wait \(|"
                     r"Runner\.run \(asyncio/runners\.py|select \(selectors\.py|.*\._wait_for_tstate_lock)")
FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def read(path: Path) -> Counter[tuple[str, ...]]:
    """`frame;frame;... count` per line (root first), as py-spy writes raw output."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def part_of(stack: tuple[str, ...]) -> str:
    if WAITING.match(stack[-1]):
        return "waiting (idle, sampled)"
    for part, pattern in PARTS:
        if any(pattern.search(frame) for frame in stack):
            return part
    return "other"


def leaf_function(stack: tuple[str, ...]) -> str:
    """The innermost frame, without its line number: whose own time the sample is."""
    match = FRAME.match(stack[-1])
    return f"{match['function']} ({match['file']})" if match else stack[-1]


def summarize(stacks: Counter[tuple[str, ...]], top: int = 15) -> str:
    total = sum(stacks.values())
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        parts[part_of(stack)] += count
        leaves[leaf_function(stack)] += count
    lines = [f"{total} on-CPU samples", "", "| part | share of samples |", "|---|--:|"]
    lines += [f"| {part} | {count / total:.1%} |" for part, count in parts.most_common()]
    lines += ["", f"| function (own samples, top {top}) | share |", "|---|--:|"]
    lines += [f"| `{name}` | {count / total:.1%} |" for name, count in leaves.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_tools.stacks", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy raw output (collapsed stacks)")
    parser.add_argument("--top", type=int, default=15, help="functions listed by own samples")
    args = parser.parse_args(argv)
    stacks = read(args.profile)
    if not stacks:
        parser.error(f"{args.profile}: no samples")
    print(summarize(stacks, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
