"""The whole PPO loop on CPU against a live r3-serve: it learns, and it survives the service failing.

The tiny config (trainer/configs/tiny-cpu.yaml says why each setting) trains a random Llama on 4
prompts with the `li` preset; LI only moves with the tokens chosen, and the policy finds that the
[unusedN] word pieces decode to three wordpunct words each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import free_port
from r3_trainer.checkpoint import STATE_FILE, latest_checkpoint
from r3_trainer.cli import main as cli_main
from r3_trainer.config import load_config
from r3_trainer.plot import read_log
from r3_trainer.rewards import RewardServiceError
from r3_trainer.trainer import PPOTrainer

pytestmark = pytest.mark.slow  # real servers, training or process faults throughout

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "trainer" / "configs" / "tiny-cpu.yaml"
DATA = ROOT / "data" / "alpacafarm_val.json"


def tiny(tmp_path: Path, url: str, *overrides: str):
    return load_config(TINY, [f"reward_url={url}", f"output_dir={tmp_path / 'run'}", f"data_path={DATA}",
                              "progress_bar=false", *overrides])


def test_reward_rises_against_the_live_service(tmp_path, server_url):
    cfg = tiny(tmp_path, server_url, "steps=40", "eval_every=20", "save_every=20")
    trainer = PPOTrainer(cfg)
    try:
        history = trainer.train()
    finally:
        trainer.close()

    assert [r["step"] for r in history] == list(range(1, 41))
    assert read_log(cfg.log_path) == json.loads(json.dumps(history))  # the JSONL holds what was returned
    rewards = [r["reward/mean"] for r in history]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    # Seeded runs go from about 0.059 to 0.081 (6 tokens: 5.9 -> 8.1 wordpunct words); a clear margin:
    assert last > first * 1.15, (first, last, rewards)
    assert last - first > 0.008, (first, last)
    kls = [r["kl"] for r in history]
    assert all(math.isfinite(k) and k < 100 for k in kls), kls  # nats per 6-token response
    assert max(kls[-10:]) > 1.0  # the policy did move away from the reference
    for record in history:
        # the li preset is LI alone: the reward is the logged length-incentive component
        assert record["reward/mean"] == pytest.approx(record["components/length_incentive"])
        assert record["components/closed_branch"] == 0.0 and record["components/relevance"] is None
        assert record["response/length_tokens"] == 6.0 and record["staleness"] == 0
        assert record["time/generation"] > 0 and record["reward/latency_s"] > 0 and record["time/update"] > 0
    evals = [r for r in history if "eval/reward/mean" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert (Path(cfg.output_dir) / "best" / "adapter_model.safetensors").exists()
    assert cfg.log_path.with_suffix(".png").stat().st_size > 10_000
    assert sorted(p.name for p in Path(cfg.output_dir).glob("checkpoint-*")) == ["checkpoint-000020",
                                                                                 "checkpoint-000040"]


class FlakyRewards(BaseHTTPRequestHandler):
    """Answers the first `good` POST /reward calls like the li preset, then 503 forever."""

    good = 0
    calls = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if type(self).calls > type(self).good:
            payload, status = {"detail": "warming up"}, 503
        else:
            li = [len(item["response"].split()) / 100 for item in body["items"]]
            parts = [{"length_incentive": x, "repetition_penalty": 1.0, "relevance": None,
                      "query_type": "open", "query_type_source": "request"} for x in li]
            payload, status = {"rewards": li, "backend": "li", "components": parts}, 200
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_service() -> Iterator[str]:
    handler = type("Flaky", (FlakyRewards,), {"good": 2, "calls": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


FAST_FAILURE = ("reward_deadline_s=1.5", "reward_max_retries=1", "reward_backoff_s=0.05",
                "reward_max_backoff_s=0.1", "reward_timeout_s=2")


def test_service_failure_checkpoints_and_resume_continues(tmp_path, flaky_service, server_url):
    # Pipelined: batch 1 (rewards OK), batch 2 generated while batch 1 is scored (OK), batch 3
    # generated while batch 2 is scored -> 503s until the deadline. Two updates happened.
    cfg = tiny(tmp_path, flaky_service, "steps=4", "overlap_generation=true", "eval_every=100",
               "save_every=100", *FAST_FAILURE)
    trainer = PPOTrainer(cfg)
    with pytest.raises(RewardServiceError) as failure:
        trainer.train()
    trained = trainer.adapter_state()
    trainer.close()
    message = str(failure.value)
    assert flaky_service in message and "HTTP 503" in message and "reward_deadline_s=1.5" in message
    assert "checkpoint-000002" in message and "--resume" in message

    checkpoint = latest_checkpoint(cfg.output_dir)
    assert checkpoint is not None and checkpoint.name == "checkpoint-000002"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    # Batches 1 and 2 (32 prompts each) were trained on; batch 3 was not, so it is where to resume.
    assert (state["step"], state["position"]) == (2, 64)
    logged = read_log(cfg.log_path)
    assert [(r["step"], r["staleness"]) for r in logged] == [(1, 0), (2, 1)]  # batch 2 was one update stale

    # --resume against the live service: the same weights, then steps 3 and 4.
    resumed_cfg = tiny(tmp_path, server_url, "steps=4", "eval_every=100", "save_every=100")
    resumed = PPOTrainer(resumed_cfg, resume=True)
    try:
        assert (resumed.step, resumed.position) == (2, 64)
        restored = resumed.adapter_state()
        assert restored.keys() == trained.keys()
        assert all(torch.equal(restored[k], trained[k]) for k in trained)
        assert resumed.optimizer.state_dict()["state"]  # Adam moments came back too
        resumed.train()
    finally:
        resumed.close()
    logged = read_log(cfg.log_path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["samples"] for r in logged] == [32, 64, 96, 128]
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint-000004"


def test_cli_stops_with_a_clear_error_when_nothing_listens(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "c.yaml"
    config.write_text(TINY.read_text())
    args = ["--config", str(config), "--set", f"reward_url={url}", "--set", f"output_dir={tmp_path / 'run'}",
            "--set", f"data_path={DATA}", "--set", "progress_bar=false"]
    args += [a for o in FAST_FAILURE for a in ("--set", o)]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert f"reward service {url} gave no rewards within reward_deadline_s=1.5s" in err
    assert "ConnectError" in err and "checkpoint of step 0" in err
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-000000"
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing was trained on, nothing logged

    assert cli_main(args) == 2  # a fresh run must not mix with the checkpoints already there
    assert "already holds checkpoint-000000: pass --resume" in capsys.readouterr().err
    assert cli_main([*args, "--resume"]) == 1  # resumes from step 0, fails the same way
    assert "checkpoint of step 0" in capsys.readouterr().err
    assert cli_main(["--config", str(config), "--set", "learning_rte=1"]) == 2
    assert "did you mean learning_rate?" in capsys.readouterr().err


TIMING = ("time/", "speed/", "reward/latency_s")


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_run_split_in_two_equals_one_run(tmp_path, server_url, estimator):
    """--resume continues exactly: steps 1-4 in one go and steps 1-2 then 3-4 after a restart
    log the same figures step by step (evaluations included) and end on the same weights."""
    settings = ("steps=4", "save_every=2", "eval_every=2", "eval_at_start=true", "dev_size=4",
                "eval_batch_size=2", f"advantage_estimator={estimator}", "group_size=2", "train_size=16",
                "plot=false")
    whole_cfg = tiny(tmp_path / "whole", server_url, *settings)
    whole = PPOTrainer(whole_cfg)
    try:
        whole.train()
        whole_weights = whole.adapter_state()
    finally:
        whole.close()

    split_cfg = tiny(tmp_path / "split", server_url, *settings)
    first = PPOTrainer(split_cfg.model_copy(update={"steps": 2}))
    try:
        first.train()
    finally:
        first.close()
    second = PPOTrainer(split_cfg, resume=True)
    try:
        assert (second.step, second.position) == (2, 2 * split_cfg.prompts_per_step)
        second.train()
        split_weights = second.adapter_state()
    finally:
        second.close()

    whole_log, split_log = read_log(whole_cfg.log_path), read_log(split_cfg.log_path)
    assert [r["step"] for r in split_log] == [0, 1, 2, 3, 4]
    assert _without_timing(split_log) == _without_timing(whole_log)
    assert split_weights.keys() == whole_weights.keys()
    assert all(torch.equal(split_weights[k], whole_weights[k]) for k in whole_weights)
    assert whole_log[-1]["kl"] > 0  # the policy moved, so equal weights are not trivially equal
    evals = sorted(p.name for p in (tmp_path / "split" / "run" / "eval").iterdir())
    assert evals == ["step-000000.jsonl", "step-000002.jsonl", "step-000004.jsonl"]


def test_the_report_evaluates_a_checkpoint_as_the_trainer_did(tmp_path, server_url):
    """One evaluation path: the report's "after" answers for the final checkpoint are, prompt for
    prompt, the trainer's own last evaluation (same seed, same batches, same scores); its "before"
    is the untrained policy, the trainer's step-0 evaluation."""
    from r3_trainer.report import main as report_main

    settings = ("steps=2", "save_every=2", "eval_every=2", "eval_at_start=true", "dev_size=6",
                "eval_batch_size=4", "eval_backends=[r3]", "plot=false")
    cfg = tiny(tmp_path, server_url, *settings)
    trainer = PPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    config = tmp_path / "c.yaml"
    config.write_text(TINY.read_text())
    overrides = [f"reward_url={server_url}", f"output_dir={tmp_path / 'run'}", f"data_path={DATA}", *settings]
    out = tmp_path / "report"
    assert report_main(["--config", str(config), "--checkpoint", str(latest_checkpoint(cfg.output_dir)),
                        "--out", str(out), *(a for o in overrides for a in ("--set", o))]) == 0

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    evals = Path(cfg.output_dir) / "eval"
    assert rows(out / "eval-after.jsonl") == rows(evals / "step-000002.jsonl")
    assert rows(out / "eval-before.jsonl") == rows(evals / "step-000000.jsonl")
    assert [r["reward"].keys() for r in rows(out / "eval-after.jsonl")] == [{"li": 0, "r3": 0}.keys()] * 6
    report = json.loads((out / "report.json").read_text())
    expected = {"reward[li]", "reward[r3]", "words", "rouge_l_closed", "hack/repeat_share"}
    assert set(report["paired"]) >= expected


def test_learning_runs_continue_from_the_committed_state(tmp_path):
    """scripts/learning-runs.sh in a fresh clone: a run stopped after step 2 left its state in the
    results folder (what gets committed); with the run folder gone, the script restores that state
    and the run continues to step 4, its earlier log kept."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = ["save_every=2", "eval_every=2", "eval_at_start=true", "dev_size=4", "eval_batch_size=4",
              f"data_path={DATA}", "plot=false"]
    env = {**os.environ, "R3_PORT": str(free_port()), "CONFIG": str(TINY), "PRESETS": "li",
           "RUN_DIR": str(runs), "OUT": str(out), "SYNC_EVERY": "1"}

    def run(steps: int) -> str:
        args = " ".join(f"--set {o}" for o in (f"steps={steps}", *common))
        done = subprocess.run(["bash", str(ROOT / "scripts" / "learning-runs.sh")],
                              env={**env, "TRAIN_ARGS": args}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr + (runs / "li.out").read_text()
        return done.stdout

    run(2)
    assert (out / "li" / "checkpoint" / "NAME").read_text().strip() == "checkpoint-000002"
    first = read_log(out / "li" / "log.jsonl")
    assert [r["step"] for r in first] == [0, 1, 2]
    shutil.rmtree(runs)  # a fresh clone: only the results folder came along
    printed = run(4)
    assert "restored li from" in printed and "checkpoint-000002" in printed
    log = read_log(out / "li" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    assert log[:3] == first
    assert (out / "li" / "checkpoint" / "NAME").read_text().strip() == "checkpoint-000004"
    assert sorted(p.name for p in (out / "li" / "eval").iterdir()) == [
        "step-000000.jsonl", "step-000002.jsonl", "step-000004.jsonl"]
