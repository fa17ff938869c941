"""Back-fill ROUGE-L recall into the learning runs' evaluations written before the trainer recorded
it (`rouge_l_recall` beside the F1 `rouge_l`). F1 falls when a correct answer grows longer; recall,
the share of the reference's words an answer covers in order, does not: the two apart tell a
longer answer from a less correct one. The answers are not touched; each closed row gets the
recall of its answer against its dev record's reference (trainer/configs/smollm2-learning.yaml's
dev split), and a row's F1 is checked to match the one recorded.

    python bench/results/learning/rouge_recall.py      # from the repository root, then compare
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from r3_trainer.config import load_config
from r3_trainer.data import load_records, split_dev
from r3_trainer.evaluation import rouge_l

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parents[2] / "trainer" / "configs" / "smollm2-learning.yaml"


def main() -> None:
    cfg = load_config(CONFIG)
    _, dev = split_dev(load_records(cfg.data_path), cfg.dev_size, cfg.seed)
    references = {record.query: record.reference for record in dev}
    for path in sorted(HERE.glob("*/eval/step-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        filled = 0
        for row in rows:
            if row["rouge_l"] is None or "rouge_l_recall" in row:
                continue
            _, recall, f1 = rouge_l(row["text"], references[row["query"]] or "")
            assert math.isclose(f1, row["rouge_l"], abs_tol=1e-12), (path, row["query"])
            row["rouge_l_recall"] = recall
            filled += 1
        if filled:
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path.relative_to(HERE)}: {filled} rows filled")


if __name__ == "__main__":
    main()
