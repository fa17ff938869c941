"""The strict query-type validation: splits, rewrites, temperature scaling, reliability and the soft
branch's reward error (`r3-qtypes eval --strict`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_classifier import run_module

from r3_service.qtype.base import INPUT_MARKER
from r3_service.rule.features import features
from r3_tools.heads import fit_temperature
from r3_tools.qtype_splits import (
    AUGMENTATIONS,
    EVAL_PHRASINGS,
    STRICT_VARIANTS,
    TRAIN_CONTEXTS,
    TRAIN_PHRASINGS,
    VARIANTS,
    drop_input,
    grouped_folds,
    inline_input,
    leading_word,
    paraphrase,
    random_folds,
)
from r3_tools.qtype_validate import (
    TextEmbedder,
    augmented,
    cross_fitted_probabilities,
    expected_calibration_error,
    reliability,
    soft_branch_errors,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "alpacafarm_val.json"
WITH_INPUT = f"Correct the grammar in the sentence. {INPUT_MARKER} She go to school."


def test_leading_word_skips_greetings_and_please() -> None:
    assert leading_word("Write a poem about rain.") == "write"
    assert leading_word("Please, write a haiku") == "write"
    assert leading_word("Hi! What is 2+2?") == "what"
    assert leading_word(WITH_INPUT) == "correct"
    assert leading_word("   ") == ""


def test_grouped_folds_keep_each_leading_word_in_one_fold_and_cover_every_row() -> None:
    queries = [f"{verb} thing number {i}" for verb in ("write", "name", "list", "explain", "given")
               for i in range(7 if verb == "write" else 3)]
    folds = grouped_folds(queries, 3)
    assert sorted(i for fold in folds for i in fold) == list(range(len(queries)))
    for fold in folds:
        words = {leading_word(queries[i]) for i in fold}
        assert all(leading_word(q) not in words for j, q in enumerate(queries) if j not in fold)
    assert max(map(len, folds)) == 7  # the largest group alone; the rest spread over the others


def test_random_folds_depend_on_the_query_not_its_position() -> None:
    queries = [f"query {i}" for i in range(50)]
    folds = random_folds(queries, 5)
    fold_of = {queries[i]: k for k, fold in enumerate(folds) for i in fold}
    reordered = list(reversed(queries))
    again = random_folds(reordered, 5)
    assert {reordered[i]: k for k, fold in enumerate(again) for i in fold} == fold_of
    assert sorted(i for fold in folds for i in fold) == list(range(50))


def test_input_rewrites() -> None:
    assert drop_input(WITH_INPUT) == "Correct the grammar in the sentence."
    assert inline_input(WITH_INPUT) == "Correct the grammar in the sentence. She go to school."
    assert drop_input("Write a poem.") == inline_input("Write a poem.") == "Write a poem."


def test_paraphrases_are_stable_keep_or_drop_the_input_and_train_never_uses_eval_phrasings() -> None:
    queries = [f"Write a story about the number {i}." for i in range(40)]
    queries += [f"What is {i} plus {i}?" for i in range(40)]
    evaluated = [VARIANTS["paraphrased"](q) for q in queries]
    trained = [AUGMENTATIONS["paraphrased"](q) for q in queries]
    assert evaluated == [VARIANTS["paraphrased"](q) for q in queries]  # a rerun: the same texts
    assert all(e != q and t != q for e, t, q in zip(evaluated, trained, queries, strict=True))
    # Every phrasing and context is used, and none of the evaluation's appears in training.
    assert any(text.startswith(TRAIN_CONTEXTS) for text in trained)
    assert not set(evaluated) & set(trained)
    probe = "Describe the sea"
    train_forms = {f(probe) for group in TRAIN_PHRASINGS for f in group}
    eval_forms = {f(probe) for group in EVAL_PHRASINGS for f in group}
    assert not train_forms & eval_forms
    kept = paraphrase(WITH_INPUT, TRAIN_PHRASINGS)
    assert kept.endswith(f"{INPUT_MARKER} She go to school.")
    assert INPUT_MARKER not in paraphrase(WITH_INPUT, EVAL_PHRASINGS, keep_input=False)
    assert set(STRICT_VARIANTS) <= set(VARIANTS)


def test_augmentation_adds_only_rewrites_that_differ() -> None:
    queries = ["Write a poem.", WITH_INPUT]
    texts, labels = augmented(queries, torch.tensor([1.0, 0.0]))
    # The poem has no input: dropping or inlining it changes nothing, paraphrasing does.
    assert len(texts) == len(set(texts)) == 2 + 1 + 3
    assert labels.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_temperature_scaling_recovers_an_overconfident_scale() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, generator=generator) * 4
    labels = (torch.rand(20000, generator=generator) < torch.sigmoid(logits / 2.5)).float()
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.08)


def test_cross_fitted_probabilities_use_each_folds_own_temperature() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, generator=generator) * 3
    labels = (torch.rand(4000, generator=generator) < torch.sigmoid(logits / 2)).float()
    rows = torch.arange(4000)
    probabilities, temperatures = cross_fitted_probabilities(logits, labels, rows, [list(range(2000)),
                                                                                    list(range(2000, 4000))])
    assert len(temperatures) == 2 and all(t == pytest.approx(2, rel=0.15) for t in temperatures)
    assert torch.allclose(probabilities[:2000], torch.sigmoid(logits[:2000] / temperatures[0]))
    before = expected_calibration_error(reliability(torch.sigmoid(logits), labels))
    after = expected_calibration_error(reliability(probabilities, labels))
    assert after < before / 2


def test_reliability_bins_count_every_prediction() -> None:
    probabilities = torch.tensor([0.05, 0.15, 0.15, 0.95, 1.0])
    table = reliability(probabilities, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert [b.count for b in table] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[1].open_share == 0.5 and math.isnan(table[2].open_share)
    assert expected_calibration_error(table) == pytest.approx((0.05 + 2 * 0.35 + 0.025 * 2) / 5)


@pytest.fixture(scope="module")
def embedder(embedding_model) -> TextEmbedder:
    return TextEmbedder(embedding_model)


def test_soft_branch_error_is_zero_when_sure_and_right_and_half_the_gap_at_a_coin_flip(embedder) -> None:
    queries = ["Write a poem about the sea.", "What is the capital of France?"]
    responses = ["The sea is wide and deep, it sings the shore to sleep.", "Paris is the capital."]
    references = ["Waves roll in under a grey sky.", "The capital of France is Paris."]
    sure = soft_branch_errors(queries, responses, references, ["open", "closed"], torch.tensor([1.0, 0.0]),
                              embedder, bands=[(0.0, 1.0)])
    assert [e.band for e in sure] == ["hard", "0–1"] and all(e.mean_abs_error == 0 for e in sure)
    coin = soft_branch_errors(queries, responses, references, ["open", "closed"], torch.tensor([0.5, 0.5]),
                              embedder, bands=[(0.0, 1.0)])
    hard, soft = coin
    # Each branch by hand: open R = LI·S(x,y)·RP; closed R = f(S(ref,y))·RP (packaged range, out 0..5.12).
    e = embedder
    gaps = []
    for q, y, ref in zip(queries, responses, references, strict=True):
        f = features(y)
        s_query = float(e([q])[0] @ e([y])[0])
        s_ref = float(e([ref])[0] @ e([y])[0])
        r_open = f.length_incentive * s_query * f.repetition_penalty
        low, high = 0.311, 3.622
        r_closed = (s_ref - low) / (high - low) * 5.12 * f.repetition_penalty
        gaps.append(abs(r_open - r_closed))
    # p = 0.5 is typed closed (p > 0.5 is open): the open query is wrong under the hard branch.
    assert hard.mean_abs_error == pytest.approx(gaps[0] / 2, rel=1e-5)
    assert soft.mean_abs_error == pytest.approx((gaps[0] + gaps[1]) / 4, rel=1e-5)
    assert soft.blended_share == 1.0 and hard.blended_share == 0.0


@pytest.mark.slow
def test_strict_eval_writes_the_report(tmp_path: Path) -> None:
    responses = tmp_path / "answers.jsonl"
    rows = json.loads(DATA.read_text())[:40]
    responses.write_text("\n".join(json.dumps({"query": r["input"], "response": r["output"][:80]})
                                   for r in rows) + "\n")
    result = run_module("r3_tools.qtypes", "eval", str(DATA), "--strict", "--limit", "160", "--folds", "2",
                        "--responses", str(responses), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "strict.json").read_text())
    assert report["queries"] == 160 and report["folds"] == 2
    cells = {(r["split"], r["variant"]) for r in report["results"]}
    splits = ("random", "grouped by leading word")
    assert cells == {(split, variant) for split in splits for variant in VARIANTS}
    assert all(0.5 < r["accuracy"] <= 1 and 0 < r["se"] < 0.1 for r in report["results"])
    assert 0.5 < report["strict"][0] < 1 and len(report["temperatures"]) == 2
    assert sum(b["count"] for b in report["reliability"]["calibrated"]) == 160 * len(STRICT_VARIANTS)
    assert set(report["soft_branch"]) == {"reference as response", "answers"}
    assert report["soft_branch"]["answers"][0]["band"] == "hard"
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 10_000
    assert "**Strict figure**" in result.stdout and "| hard |" in result.stdout
