"""r3-bench --fidelity: the RL-facing agreement measures, by hand, and one real run of the engine."""

from __future__ import annotations

import json

import pytest

from r3_tools import fidelity
from r3_tools.bench import main as bench_main


def test_agreement_measures_by_hand():
    exact = [[0.1, 0.2, 0.3, 0.3], [1.0, 0.0, 0.5, 0.4]]
    other = [[0.1, 0.25, 0.2, 0.3], [1.0, 0.0, 0.5, 0.4]]
    result = fidelity.compare(exact, other)
    # group 1: 5 ordered pairs (0.3/0.3 is a tie), of which (1, 2) flips; group 2: 6 of 6 kept
    assert result["pairs"] == 11 and result["pairwise_order_agreement"] == pytest.approx(10 / 11)
    assert result["best_answer_agreement"] == 1.0  # 0.3 and 0.3 tie in fp32: either is its best
    assert fidelity.compare([[0.1, 0.3]], [[0.2, 0.1]])["best_answer_agreement"] == 0.0
    assert result["max_abs_reward_diff"] == pytest.approx(0.1)
    assert result["max_rel_reward_diff"] == pytest.approx(0.1 / 0.3)
    a_exact, a_other = fidelity.advantages(exact[0]), fidelity.advantages(other[0])
    advantage_errors = [abs(a - b) for a, b in zip(a_exact, a_other, strict=True)]
    assert result["advantage_error_max_sd"] == pytest.approx(max(advantage_errors))
    assert fidelity.compare(exact, exact)["advantage_error_max_sd"] == 0.0


@pytest.mark.slow  # two engines, about 10 s
def test_fidelity_of_fp32_against_itself_is_exact_and_bf16_is_measured(tmp_path):
    out = tmp_path / "fidelity"
    args = ["--fidelity", "float32,bfloat16,auto", "--groups", "4", "--device", "cpu", "--out", str(out)]
    assert bench_main(args) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    auto = fidelity.resolved("auto", "cpu")
    assert auto in ("auto (bfloat16)", "auto (float32)")  # what the precision rule picks here
    assert [(r["dtype"], r["kind"]) for r in rows] == [("float32", "others"), ("float32", "prefixes"),
                                                       ("bfloat16", "others"), ("bfloat16", "prefixes"),
                                                       (auto, "others"), (auto, "prefixes")]
    for row in rows[:2]:
        assert row["pairwise_order_agreement"] == 1.0 and row["max_abs_reward_diff"] == 0.0
        assert row["groups"] == 4 and row["pairs"] > 0
    assert all(0 < r["max_abs_reward_diff"] < 0.05 for r in rows[2:4])  # bf16 moves rewards, a little
    assert rows[4:] == [{**r, "dtype": auto} for r in (rows[2:4] if "bfloat16" in auto else rows[:2])]
    assert "| bfloat16 | 4 prefixes |" in out.with_suffix(".md").read_text()
