"""Score the learning runs' recorded held-out answers under a preset they were not evaluated with
(added after the runs began), so every run's curves can be read under it. The answers are not
touched; each row's `reward` gains the backend's reward of the same answer, scored by a live
service the way the trainer scores (`r3_trainer.evaluation.score`: the dev record's query,
reference and query type). A row that has the backend already is checked against the service.

    r3-serve --port 8000 &                                 # R3_DTYPE=float32, as the runs
    python bench/results/learning/rescore.py r3-bounded    # from the repository root
"""

from __future__ import annotations

import argparse
import math

from backfill import dev_records, evaluations, save

from r3_trainer.evaluation import score
from r3_trainer.rewards import RewardScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    by_query = dev_records()
    scorer = RewardScorer(args.url, backend=None, deadline_s=600)
    for path, rows in evaluations():
        records = [by_query[row["query"]] for row in rows]
        rewards = score(scorer, records, [row["text"] for row in rows], [args.backend])[args.backend].rewards
        filled = 0
        for row, reward in zip(rows, rewards, strict=True):
            known = row["reward"].get(args.backend)
            if known is not None:
                assert math.isclose(known, reward, abs_tol=1e-5), (path, row["query"], known, reward)
                continue
            row["reward"][args.backend] = reward
            filled += 1
        save(path, rows, filled)


if __name__ == "__main__":
    main()
