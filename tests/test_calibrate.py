"""r3-calibrate: the proposed range puts the closed branch on the open branch's scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DATA
from r3_service.settings import PACKAGED_MODEL_RANGE
from r3_tools.calibrate import calibrate, main, read_examples


@pytest.fixture(scope="module")
def examples():
    usable, skipped = read_examples(DATA)
    assert skipped == 1 and len(usable) == 1999  # one AlpacaFarm row has an empty output
    return usable[:120]


@pytest.mark.slow
def test_proposed_range_maps_the_quantiles_onto_each_other(embedding_model, examples) -> None:
    result = calibrate(embedding_model, examples, max_rollout_tokens=512, quantiles=(0.1, 0.9))
    lo, hi = result.relevance_in_range
    assert lo < hi
    for q in (0.1, 0.9):
        s = float(torch.quantile(result.closed_relevance, q))
        mapped = (s - lo) / (hi - lo) * 5.12
        assert mapped == pytest.approx(float(torch.quantile(result.open_rewards, q)), abs=1e-4)
    # MiniLM's cosine range [0, 1] would pay closed queries several times what open ones earn.
    default_median = float(result.closed_rewards((0.0, 1.0)).median())
    proposed_median = float(result.closed_rewards(result.relevance_in_range).median())
    open_median = float(result.open_rewards.median())
    assert abs(proposed_median - open_median) < abs(default_median - open_median)


@pytest.mark.slow
def test_dataset_responses_are_used_when_present(embedding_model, examples, tmp_path: Path) -> None:
    rows = [{"query": e.query, "reference": e.reference, "query_type": "closed" if e.closed else "open",
             "response": e.reference[: max(1, len(e.reference) // 2)]} for e in examples[:40]]
    path = tmp_path / "with-responses.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with_responses, _ = read_examples(path)
    result = calibrate(embedding_model, with_responses)
    assert result.responses and len(result.closed_relevance) == sum(e.closed for e in with_responses)


@pytest.mark.slow
def test_cli_prints_the_quantiles_and_the_proposal(tmp_path: Path, capsys) -> None:
    path = tmp_path / "small.json"
    path.write_text(json.dumps(json.loads(DATA.read_text())[:60]))
    assert main([str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| closed S (" in out and "| open reward LI·S·RP (" in out and "q90" in out
    assert "relevance_in_range: [" in out
    assert main([str(path), "--device", "cpu", "--json"]) == 0
    proposal = json.loads(capsys.readouterr().out)
    assert proposal["records"] == 60 and proposal["relevance_in_range"][0] < proposal["relevance_in_range"][1]


@pytest.mark.parametrize("args,needle", [
    (["--quantiles", "0.9,0.1"], "--quantiles"),
    (["--limit", "3"], "need 10 or more"),
])
def test_cli_refuses_bad_arguments(args: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(DATA), *args])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
def test_the_packaged_models_default_range_is_what_calibrate_proposes(embedding_model) -> None:
    """settings.PACKAGED_MODEL_RANGE is r3-calibrate's proposal on the shipped data set, and with it
    the two branches' median rewards agree within 1.5x (the cosine default [0, 1] is ~8x apart)."""
    usable, _ = read_examples(DATA)
    result = calibrate(embedding_model, usable, max_rollout_tokens=512, quantiles=(0.1, 0.9))
    assert result.relevance_in_range == pytest.approx(PACKAGED_MODEL_RANGE, abs=5e-4)
    closed = float(result.closed_rewards(PACKAGED_MODEL_RANGE).median())
    open_ = float(result.open_rewards.median())
    assert 1 / 1.5 < closed / open_ < 1.5
    assert float(result.closed_rewards((0.0, 1.0)).median()) / open_ > 5
