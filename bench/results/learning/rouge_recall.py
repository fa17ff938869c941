"""Back-fill ROUGE-L recall into the learning runs' evaluations written before the trainer recorded
it (`rouge_l_recall` beside the F1 `rouge_l`). F1 falls when a correct answer grows longer; recall,
the share of the reference's words an answer covers in order, does not: the two apart tell a
longer answer from a less correct one. The answers are not touched; each closed row gets the
recall of its answer against its dev record's reference (trainer/configs/smollm2-learning.yaml's
dev split), and a row's F1 is checked to match the one recorded.

    python bench/results/learning/rouge_recall.py      # from the repository root, then compare
"""

from __future__ import annotations

import math

from backfill import dev_records, evaluations, save

from r3_trainer.evaluation import rouge_l


def main() -> None:
    records = dev_records()
    for path, rows in evaluations():
        filled = 0
        for row in rows:
            if row["rouge_l"] is None or "rouge_l_recall" in row:
                continue
            _, recall, f1 = rouge_l(row["text"], records[row["query"]].reference or "")
            assert math.isclose(f1, row["rouge_l"], abs_tol=1e-12), (path, row["query"])
            row["rouge_l_recall"] = recall
            filled += 1
        save(path, rows, filled)


if __name__ == "__main__":
    main()
