"""python -m r3_tools.stacks: a py-spy profile's samples shared out by part, by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from r3_tools import stacks

CLI = "<module> (r3_service/cli.py:9)"
SCHEDULER = "BatchScheduler.run (r3_service/engine/scheduler.py:80)"
ROUTE = "reward (r3_service/api/routes.py:50)"
RAW = "\n".join([
    f"{CLI};{SCHEDULER};EmbeddingModel.forward (r3_service/models/embedding.py:140);"
    "Linear.forward (torch/nn/modules/linear.py:125) 6",
    f"{CLI};{ROUTE};features_of (r3_service/rule/features.py:20) 2",
    f"{CLI};{ROUTE};validate_python (pydantic/main.py:7) 1",
    f"{CLI};_worker (concurrent/futures/thread.py:90) 1",
    "",
])


def test_samples_are_shared_by_part(tmp_path: Path) -> None:
    profile = tmp_path / "raw.txt"
    profile.write_text(RAW + "a line that is not a sample\n")
    read = stacks.read(profile)
    assert sum(read.values()) == 10
    parts = {stacks.part_of(stack): count for stack, count in read.items()}
    # the rule wins over the API that called it; an idle pool thread is not work
    assert parts == {"forward pass": 6, "rule (features, guards)": 2, "API (HTTP, JSON, validation)": 1,
                     "waiting (idle, sampled)": 1}
    summary = stacks.summarize(read)
    assert "| forward pass | 60.0% |" in summary
    assert "`Linear.forward (torch/nn/modules/linear.py)` | 60.0%" in summary


def test_an_empty_profile_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "raw.txt").write_text("")
    with pytest.raises(SystemExit) as exit_:
        stacks.main([str(tmp_path / "raw.txt")])
    assert exit_.value.code == 2 and "no samples" in capsys.readouterr().err
