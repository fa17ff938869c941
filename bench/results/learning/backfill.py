"""What the back-fill scripts share: the dev records of the learning config, and each recorded
held-out evaluation read, then written back when a script filled rows in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from r3_trainer.config import load_config
from r3_trainer.data import Record, load_records, split_dev

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parents[2] / "trainer" / "configs" / "smollm2-learning.yaml"


def dev_records() -> dict[str, Record]:
    """query -> dev record (trainer/configs/smollm2-learning.yaml's dev split)."""
    cfg = load_config(CONFIG)
    _, dev = split_dev(load_records(cfg.data_path), cfg.dev_size, cfg.seed)
    return {record.query: record for record in dev}


def evaluations() -> Iterator[tuple[Path, list[dict]]]:
    """Every run's recorded evaluation: (path, rows)."""
    for path in sorted(HERE.glob("*/eval/step-*.jsonl")):
        yield path, [json.loads(line) for line in path.read_text().splitlines()]


def save(path: Path, rows: list[dict], filled: int) -> None:
    if filled:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{path.relative_to(HERE)}: {filled} rows filled")
