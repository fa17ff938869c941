"""`r3-audit`: the perturbations, the statistics, the threshold check, and whole runs through the
real engine (R3 presets on the packaged MiniLM, a tiny reward model, an ensemble)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import DATA, ROOT, app_settings, in_process, save_tiny_bert
from r3_tools import audit
from r3_tools.audit import FILLER, Record, Slot

ANSWER = "Paris is the capital of France. It lies on the Seine. About two million people live there."


def slot(response: str = ANSWER, *, query: str = "What is the capital of France?",
         reference: str | None = None, query_type: str = "open", index: int = 0,
         other: str = "Some other answer.") -> Slot:
    return Slot(Record(query, response, reference, query_type, True), index, 7, other)


def words(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------------------------ perturbations


def test_repeats_multiply_the_word_count() -> None:
    assert words(audit.repeat_2x(slot()) or "") == 2 * words(ANSWER)
    assert words(audit.repeat_4x(slot()) or "") == 4 * words(ANSWER)
    assert (audit.repeat_4x(slot()) or "").count(ANSWER) == 4


@pytest.mark.parametrize("start", [0, 3, 13])
def test_filler_doubles_the_length_with_generic_sentences_only(start: int) -> None:
    padded = audit.filler_2x(slot(index=start)) or ""
    n = words(ANSWER)
    assert padded.startswith(ANSWER)
    assert 2 * n <= words(padded) < 2 * n + max(words(s) for s in FILLER)
    rest = padded[len(ANSWER):].strip()
    first = FILLER[start % len(FILLER)]
    assert rest.startswith(first)  # cycled deterministically from the item's position
    assert all(s in FILLER for s in (f"{p}." for p in rest.removesuffix(".").split(". ")))
    assert audit.filler_2x(slot(index=start)) == padded


def test_shuffle_keeps_the_words_and_is_seeded() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    shuffled = audit.shuffle(slot(text))
    assert shuffled != text and Counter(shuffled.split()) == Counter(text.split())
    assert audit.shuffle(slot(text)) == shuffled  # same seed and position: the same order
    assert audit.shuffle(slot(text, index=1)) != shuffled


def test_first_sentence_skips_list_markers_and_keeps_short_answers_whole() -> None:
    assert audit.first_sentence(ANSWER) == "Paris is the capital of France."
    assert audit.first_sentence("1. Mix the flour and water.\n2. Knead it.") == "1. Mix the flour and water."
    assert audit.first_sentence("Dr. Who is a TV show! Yes.") == "Dr. Who is a TV show!"
    assert audit.first_sentence("Paris.") == "Paris."


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_derangement_is_a_seeded_permutation_without_fixed_points(n: int) -> None:
    order = audit.derangement(n, seed=5)
    assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert audit.derangement(n, seed=5) == order


def records(n: int = 12) -> list[Record]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        answer = " ".join(rng.choice("abcdefgh") + str(i) for _ in range(12)) + ". Second sentence here ok."
        closed = i % 2 == 0
        reference = (answer if i % 4 == 0 else f"reference {i}") if closed else None
        kind = "closed" if closed else "open"
        out.append(Record(f"question {i} about things", answer, reference, kind, True))
    return out


def test_perturb_keeps_only_defined_and_changed_responses() -> None:
    recs = [*records(), Record("q dup", "same answer", None, "open", True),
            Record("q dup 2", "same answer", None, "open", True), Record("q empty", "  ", None, "open", True)]
    out = audit.perturb(recs, seed=3)
    assert list(out) == list(audit.PERTURBATIONS)
    for name, pairs in out.items():
        assert all(text.strip() != recs[i].response.strip() for i, text in pairs), name
    swapped = dict(out["swap"])
    assert all(swapped[i] != recs[i].response for i in swapped)
    assert len(swapped) >= len(recs) - 3  # only identical answers drop out
    # The reference is copied only on closed items whose reference is not the response itself.
    assert sorted(i for i, _ in out["copy-reference"]) == [i for i, r in enumerate(recs)
                                                           if r.query_type == "closed" and i % 4 != 0]
    assert len(recs) - 1 not in dict(out["empty"])  # an empty true response has no empty variant
    assert dict(out["copy-query"])[0] == recs[0].query


def test_chunks_hold_whole_records() -> None:
    """A record's true and perturbed responses are scored in one request (a running ensemble's
    moments are then the same for both)."""
    recs = records(30)
    perturbed = audit.perturb(recs, seed=0)
    chunks = audit.items_to_score(recs, perturbed, size=40)
    keys = [key for chunk in chunks for key, _ in chunk]
    assert len(keys) == len(set(keys)) == len(recs) + sum(map(len, perturbed.values()))
    where = {key: number for number, chunk in enumerate(chunks) for key, _ in chunk}
    assert all(where[(i, name)] == where[(i, None)] for name, pairs in perturbed.items() for i, _ in pairs)
    assert len(chunks) > 5 and all(len(chunk) <= 40 for chunk in chunks)
    texts = {key: item for chunk in chunks for key, item in chunk}
    assert texts[(3, None)] == (recs[3].query, recs[3].response, recs[3].reference, "open")
    assert texts[(3, "empty")][1] == ""


def test_reading_records_uses_responses_and_marks_stand_ins(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [{"input": "Q1", "output": "R1", "qtype": "closed"},
             {"input": "Q2", "output": "R2", "qtype": "closed", "response": "A2"},
             {"input": "Q3", "output": "R3", "qtype": "OPENENDED"},
             {"input": "Q4", "output": "R4"},  # no type: skipped
             {"input": "Q5", "qtype": "open"}]  # nothing to stand in as a response: skipped
    path.write_text("\n".join(json.dumps(x) for x in lines))
    kept, skipped = audit.read_audit_records(path)
    assert [(r.query, r.response, r.reference, r.query_type, r.own_response) for r in kept] == [
        ("Q1", "R1", "R1", "closed", False), ("Q2", "A2", "R2", "closed", True),
        ("Q3", "R3", "R3", "open", False)]
    assert len(skipped) == 2 and "line 4" in skipped[0] and "line 5" in skipped[1]
    dropped, _ = audit.read_audit_records(path, closed_reference="drop")
    assert [r.reference for r in dropped] == [None, "R2", "R3"]  # only a closed item's


# --------------------------------------------------------------------------------- statistics


def test_compare_counts_strict_wins_and_ties() -> None:
    got = audit.compare([1.0, 2.0, 3.0, 1.0], [0.5, 2.0 + 1e-8, 4.0, 1.0])
    assert got["n"] == 4 and got["win_rate"] == 0.25 and got["tie_share"] == 0.5
    assert got["reward_ratio"] == pytest.approx(7.5 / 7.0)
    assert got["mean_delta"] == pytest.approx(0.5 / 4)
    assert audit.compare([-1.0, -2.0], [0.0, 0.0])["reward_ratio"] is None  # not a ratio of signed means


def test_spearman_uses_average_ranks() -> None:
    assert audit.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert audit.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert audit.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert audit.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert audit.spearman([1, 1, 1], [1, 2, 3]) is None
    # Float noise between batches is no order: these are ties.
    assert audit.spearman([1.0, 1.0 + 1e-8, 2.0], [2.0, 1.0, 3.0]) == pytest.approx(
        audit.spearman([1.0, 1.0, 2.0], [2.0, 1.0, 3.0]))


def test_spearmans_standard_error_is_a_seeded_bootstrap() -> None:
    rising = list(range(50))
    assert audit.spearman_se(rising, rising) == pytest.approx(0.0, abs=1e-12)  # every resample: 1
    noisy = [x + (7 * x % 13) for x in rising]
    se = audit.spearman_se(rising, noisy)
    assert se is not None and 0.005 < se < 0.2
    assert audit.spearman_se(rising, noisy) == se  # the same draws on a rerun
    fewer = audit.spearman_se(rising[:12], noisy[:12])
    assert fewer is not None and fewer > se  # fewer items, a wider figure


def test_quantiles_interpolate_like_numpy() -> None:
    assert audit.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert audit.quantile([1, 2, 3, 4, 5], 0.1) == pytest.approx(1.4)


def result(rate: float, n: int = 100) -> dict:
    return {"n": n, "win_rate": rate}


def test_thresholds_flag_rates_below_their_floor(tmp_path: Path) -> None:
    results = {"a": {"copy-query": {"all": result(0.90), "open": result(0.5)},
                     "swap": {"all": result(0.99)}, "copy-reference": {"all": result(None, 0)}},  # type: ignore[arg-type]
               "b": {"copy-query": {"all": result(0.97)}, "swap": {"all": result(0.80)}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"*": {"copy-query": 0.95, "swap": 0.9},
                                    "a": {"copy-query@open": 0.6, "copy-reference": 0.5},
                                    "b": {"copy-query": 0.99}, "absent": {"empty": 1.0}}))
    violations, notes = audit.check(results, audit.read_thresholds(path))
    assert {(v["backend"], v["perturbation"], v["floor"]) for v in violations} == {
        ("a", "copy-query", 0.95), ("a", "copy-query@open", 0.6), ("b", "copy-query", 0.99),
        ("b", "swap", 0.9)}
    assert notes == ["a: copy-reference: no items to measure (floor 0.5 not checked)"]
    line = audit.violation_line(violations[0])
    assert line == "backend a, perturbation copy-query: win rate 0.900 < floor 0.950 (n=100)"


@pytest.mark.parametrize("content,needle", [
    ({"r3": {"copy-question": 0.9}}, "unknown perturbation 'copy-question'"),
    ({"r3": {"swap@middle": 0.9}}, "unknown perturbation 'swap@middle'"),
    ({"r3": {"swap": 1.5}}, "in [0, 1]"),
    ({"r3": [0.5]}, "expected"),
])
def test_bad_threshold_files_are_refused(tmp_path: Path, content: object, needle: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        audit.read_thresholds(path)


def test_shipped_thresholds_hold_on_the_shipped_results() -> None:
    """The floors guard r3-novel's copy-the-question fix and r3, and the committed full-data run
    (bench/results/audit/presets.json) meets them, with a margin."""
    floors = audit.read_thresholds(ROOT / "configs" / "audit-thresholds.yaml")
    assert floors["r3-novel"]["copy-query"] >= 0.95 and len(floors["r3"]) >= 5
    results = json.loads((ROOT / "bench" / "results" / "audit" / "presets.json").read_text())["results"]
    assert audit.check(results, floors) == ([], [])
    raised = {b: {k: v + 0.06 for k, v in f.items()} for b, f in floors.items() if b != "*"}
    assert len(audit.check(results, raised)[0]) >= 10  # the floors sit close to what was measured


def test_shipped_guarded_floors_hold_on_the_validation_fold() -> None:
    """r3-guarded's floors cover each hack it closes, on both branches' informative side, and the
    committed run on the validation fold (which designed nothing) meets every floor there."""
    floors = audit.read_thresholds(ROOT / "configs" / "audit-thresholds.yaml")
    guarded = floors["r3-guarded"]
    for name in ("copy-query@open", "query+answer@open", "repeat-2x@open", "question-reworded@open",
                 "filler-hedge@open", "filler-motivate@open", "input-echo@closed"):
        assert guarded[name] >= 0.8, name
    report = json.loads((ROOT / "bench" / "results" / "audit" / "guarded-validation.json").read_text())
    assert report["meta"]["split"] == "validation"
    assert audit.check(report["results"], floors) == ([], [])


# ------------------------------------------------------------------------------- whole runs


def run(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    code = audit.main([str(DATA), "--out", str(tmp_path), "--name", "a", *argv])
    return code, json.loads((tmp_path / "a.json").read_text())


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """r3, r3-novel and relevance on the first 40 records (one MiniLM, shared)."""
    out = tmp_path_factory.mktemp("audit")
    code, report = run(out, "--limit", "40", "--backend", "r3-novel", "--backend", "relevance",
                       "--compare-with", "r3")
    assert code == 0
    return out, report


@pytest.mark.slow  # the presets fixture: MiniLM on 40 records, ~25 s on 2 cores
def test_relevance_loses_to_the_copied_question_and_r3_novel_does_not(presets: tuple[Path, dict]) -> None:
    _, report = presets
    assert set(report["results"]) == {"r3-novel", "relevance", "r3"}
    assert report["perturbations"]["copy-query"]["n"] == 40
    # S(x, x) is a cosine model's maximum: only the rare item that beats its own question wins.
    assert report["results"]["relevance"]["copy-query"]["all"]["win_rate"] <= 0.1
    assert report["results"]["relevance"]["copy-query"]["open"]["win_rate"] == 0.0
    assert report["results"]["r3-novel"]["copy-query"]["all"]["win_rate"] >= 0.9
    assert report["results"]["r3-novel"]["copy-query"]["open"]["win_rate"] >= 0.9
    assert report["results"]["r3-novel"]["copy-query"]["all"]["reward_ratio"] <= 0.05  # an echo earns ~0
    assert report["results"]["r3"]["empty"]["all"]["win_rate"] == 1.0


@pytest.mark.slow  # the presets fixture: MiniLM on 40 records, ~25 s on 2 cores
def test_report_counts_branches_and_correlations(presets: tuple[Path, dict]) -> None:
    _, report = presets
    meta = report["meta"]
    assert meta["open"] + meta["closed"] == meta["records"] == 40
    # No response field: the reference stands in everywhere.
    assert meta["response_is_reference"] == 40 and meta["response_is_reference_closed"] == meta["closed"]
    assert report["perturbations"]["copy-reference"]["n"] == 0
    for backend in report["results"]:
        dist = report["branches"][backend]
        assert dist["open"]["n"] == meta["open"] and set(dist["open"]["quantiles"]) == {
            "q10", "q25", "q50", "q75", "q90"}
        q = list(dist["closed"]["quantiles"].values())
        assert q == sorted(q)
    # r3's closed branch pays S(y, y) here: far above its open branch.
    assert report["branches"]["r3"]["median_ratio_closed_open"] > 1
    assert report["spearman"]["with"] == "r3" and report["spearman"]["rho"]["r3"] == pytest.approx(1.0)
    assert -1 <= report["spearman"]["rho_open"]["r3-novel"] <= 1
    assert report["spearman"]["rho_se"]["r3"] is None  # the base against itself: no spread
    assert 0 <= report["spearman"]["rho_open_se"]["r3-novel"] < 0.5


@pytest.mark.slow  # the presets fixture: MiniLM on 40 records, ~25 s on 2 cores
def test_report_files_are_written_and_the_table_printed(presets: tuple[Path, dict]) -> None:
    out, report = presets
    md = (out / "a.md").read_text()
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| copy-query | 40 |" in md and "## Win rate, open items" in md and "torch" in md
    assert "r3-audit " in report["meta"]["command"] and "--limit 40" in md


def test_thresholds_fail_the_run_naming_what_fell_short(tmp_path: Path, capsys) -> None:
    """`li` pays length alone: the repeated answer beats the true one every time."""
    floors = tmp_path / "floors.yaml"
    floors.write_text(yaml.safe_dump({"li": {"repeat-2x": 0.5, "empty": 0.9}, "*": {"first-sentence": 0.8}}))
    code, report = run(tmp_path, "--limit", "30", "--backend", "li", "--thresholds", str(floors))
    captured = capsys.readouterr()
    assert code == 1 and report["results"]["li"]["repeat-2x"]["all"]["win_rate"] == 0.0
    assert ("THRESHOLD VIOLATION: backend li, perturbation repeat-2x: win rate 0.000 < floor 0.500"
            in captured.err)
    assert "perturbation empty" not in captured.err and "first-sentence" not in captured.err
    assert "| repeat-2x | 30 |" in captured.out  # the markdown goes to stdout
    floors.write_text(yaml.safe_dump({"li": {"empty": 0.9}}))
    assert run(tmp_path, "--limit", "30", "--backend", "li", "--thresholds", str(floors))[0] == 0


def test_unknown_backend_is_refused(tmp_path: Path, capsys) -> None:
    assert audit.main([str(DATA), "--out", str(tmp_path), "--backend", "gpt-judge"]) == 2
    assert "unknown backend(s) gpt-judge" in capsys.readouterr().err


def test_reward_model_and_ensemble_backends(tmp_path: Path) -> None:
    model = save_tiny_bert(tmp_path / "rm", "BertForSequenceClassification", num_labels=1,
                           initializer_range=0.5)
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"default_backend": "rm", "backends": {
        "rm": {"kind": "hf-reward-model", "model": str(model)},
        "li": {"kind": "r3", "preset": "li"},
        "mix": {"kind": "ensemble", "members": [{"backend": "rm"}, {"backend": "li", "weight": 0.5}]}}}))
    code, report = run(tmp_path, "--config", str(config), "--limit", "40")
    assert code == 0 and set(report["results"]) == {"rm", "li", "mix"}
    assert report["meta"]["backends"]["rm"]["kind"] == "hf-reward-model"
    assert report["meta"]["backends"]["mix"]["kind"] == "ensemble"
    for backend in ("rm", "mix"):
        for name, counts in report["perturbations"].items():
            got = report["results"][backend][name]["all"]
            assert got["n"] == counts["n"]
            assert counts["n"] == 0 or 0 <= got["win_rate"] + got["tie_share"] <= 1
    # The ensemble is the weighted sum of its members, item by item: so are the mean differences.
    for name in ("copy-query", "swap", "empty"):
        parts = [report["results"][b][name]["all"]["mean_delta"] for b in ("rm", "li")]
        assert report["results"]["mix"][name]["all"]["mean_delta"] == pytest.approx(parts[0] + 0.5 * parts[1])


def test_over_http_the_service_gives_the_in_process_rewards() -> None:
    recs, _ = audit.read_audit_records(DATA)
    chunks = audit.items_to_score(recs[:20], audit.perturb(recs[:20], 0), size=64)
    settings = {"backends": {"li": {"kind": "r3", "preset": "li"}, "lppo": {"kind": "r3", "preset": "lppo"}},
                "default_backend": "li", "qtype_classifier": "none"}
    with in_process(**settings) as client:
        remote, described = audit.score_over_http("http://testserver", ["li", "lppo"], chunks,
                                                  http_client=client)
    local, _ = audit.score_in_process(app_settings(**settings, max_queue_tokens=2**18), ["li", "lppo"],
                                      chunks)
    assert described["lppo"]["preset"] == "lppo"
    assert len(remote["li"]) == sum(map(len, chunks)) > 150
    for backend in ("li", "lppo"):
        assert list(remote[backend]) == list(local[backend])
        assert list(remote[backend].values()) == pytest.approx(list(local[backend].values()))


@pytest.mark.slow  # MiniLM on 200 records x 19 perturbations, ~90 s on 2 cores
def test_the_shipped_floors_guard_r3_guarded_on_fresh_validation_scores(tmp_path: Path) -> None:
    """CI's guard of the preset that closes the padding, restating and echo holes: scored now on
    records of the fold that designed nothing."""
    code, report = run(tmp_path, "--split", "validation", "--limit", "200", "--backend", "r3-guarded",
                       "--thresholds", str(ROOT / "configs" / "audit-thresholds.yaml"))
    assert code == 0 and report["violations"] == []
    assert report["meta"]["split"] == "validation" and report["meta"]["records"] == 200


@pytest.mark.slow  # MiniLM on 300 records x 10 perturbations, ~30 s on 2 cores
def test_the_shipped_floors_guard_r3_novel_on_fresh_scores(tmp_path: Path) -> None:
    """CI's guard of the preset that closes the copy hole: scored now, not read from a file."""
    code, report = run(tmp_path, "--limit", "300", "--backend", "r3-novel",
                       "--thresholds", str(ROOT / "configs" / "audit-thresholds.yaml"))
    assert code == 0 and report["violations"] == []
    assert report["results"]["r3-novel"]["copy-query"]["all"]["win_rate"] >= 0.95


def test_the_split_is_the_filler_heads_design_fold_and_the_rest() -> None:
    from r3_tools.filler import design_rows

    records, _ = audit.read_audit_records(DATA)
    design, validation = (audit.split_records(records, s) for s in ("design", "validation"))
    assert len(design) + len(validation) == len(records) and len(validation) > 900
    assert {r.query for r in design}.isdisjoint({r.query for r in validation})
    assert [r.query for r in design] == [records[i].query for i in design_rows([r.query for r in records])]


def test_hack_families_are_defined_where_they_should_be() -> None:
    record = Record("Fix the spelling.\n\n### Input:\nTeh cat.", "The cat.", "The cat.", "closed", True)
    slot = Slot(record, 0, 0, "other")
    assert audit.PERTURBATIONS["input-echo"](slot) == "Teh cat."
    no_input = Slot(Record("Why?", "Because.", None, "open", True), 0, 0, "x")
    assert audit.PERTURBATIONS["input-echo"](no_input) is None
    padded = audit.PERTURBATIONS["filler-preamble"](slot)
    assert padded.endswith("The cat.") and len(padded.split()) > 20
    assert audit.PERTURBATIONS["filler-hedge"](slot).startswith("The cat.")
    assert audit.PERTURBATIONS["question-reworded"](slot) != record.query
