"""r3-guarded and its detectors: what each one marks and leaves alone, the reward they make, the
filler head on padding it never saw, and the preset through the service."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA
from r3_service.models.filler import FillerHead
from r3_service.rule.features import word_tokens
from r3_service.rule.guards import GuardParams, detect, filler_flags, filler_units, guarded_reward, tokenise
from r3_tools.filler import TRAINING_FILLER
from r3_tools.hacks import FILLER_STYLES, input_section, pad, reword

QUERY = "What is the difference between machine learning and deep learning?"
ANSWER = ("Machine learning is a subset of artificial intelligence in which algorithms learn patterns "
          "from data. Deep learning is a kind of machine learning that uses neural networks with many "
          "layers.")


def reasons(query: str, response: str, reference: str | None = None, filler: list[bool] | None = None) -> set:
    return {r for r in detect(query, tokenise(response), reference, filler).unpaid if r}


def test_tokenise_gives_r3s_word_tokens_and_sentences() -> None:
    records = json.loads(DATA.read_text())[:300]
    for record in records:
        text = record["output"].strip()
        split = tokenise(text)
        assert split.tokens == word_tokens(text)
        assert all(text[a:b] == token for (a, b), token in zip(split.spans, split.tokens, strict=True))
    assert tokenise("One. Two!\nThree? Four").sentence_texts() == ["One.", "Two!", "Three?", "Four"]


def test_an_honest_answer_is_paid_in_full() -> None:
    detection = detect(QUERY, tokenise(ANSWER))
    assert detection.unpaid_share == 0 and detection.paid_text() == ANSWER
    # restating a phrase of the question is what answers do
    assert reasons("What is the capital of France?", "The capital of France is Paris.") == set()


@pytest.mark.parametrize(("response", "reason"), [
    (QUERY, "echo"),
    (f"{QUERY}\n\n{ANSWER}", "echo"),
    (f"{ANSWER}\n{ANSWER}", "repeat"),
    ("Could you tell me the difference between deep learning and machine learning?", "restate"),
])
def test_each_hack_is_marked_with_its_reason(response: str, reason: str) -> None:
    assert reason in reasons(QUERY, response)


def test_the_pasted_question_is_cut_and_the_answer_kept() -> None:
    detection = detect(QUERY, tokenise(f"{QUERY}\n\n{ANSWER}"))
    params = GuardParams()
    assert detection.paid_text() == ANSWER and detection.moves_relevance(params)
    closer = f"{ANSWER} {ANSWER[:40]} and so on. I hope this helps!"
    small = detect(QUERY, tokenise(closer), None, [False, False, False, True])
    assert 0 < small.unpaid_share < params.reread_share and not small.moves_relevance(params)
    share = len(word_tokens(QUERY)) / len(word_tokens(f"{QUERY} {ANSWER}"))
    assert detection.shares["echo"] == pytest.approx(share)


def test_input_echo_counts_what_the_reference_does_not_keep() -> None:
    query = ("Correct the grammar in this sentence.\n\n### Input:\n"
             "She go to the store every days for buy bread.")
    reference = "She goes to the store every day to buy bread."
    assert input_section(query) == "She go to the store every days for buy bread."
    assert "input_echo" in reasons(query, input_section(query), reference)
    assert reasons(query, reference, reference) == set()  # the edit itself keeps what it should


def test_input_echo_is_found_whatever_the_reference_keeps_of_it() -> None:
    # The reference keeps "She was excited to": the copy is still the input, whole.
    query = ("Rewrite the sentence using different words.\n\n### Input:\n"
             "She was excited to finally arrive at the destination.")
    reference = "She was excited to reach the place at last."
    detection = detect(query, tokenise(input_section(query)), reference)
    assert detection.shares["input_echo"] >= 0.6
    assert detection.paid_text() == "She was excited to"  # what the reference keeps stays paid
    # An open task's material handed back is no answer either; a short input is only its topic.
    respond = "Respond to the given comment.\n\n### Input:\nI can't believe he said that to everyone."
    assert reasons(respond, f"Sure. {input_section(respond)}") == {"input_echo"}
    poem = "Write a poem about the season.\n\n### Input:\nSpring"
    assert reasons(poem, "Spring wakes the sleeping hills.") == set()


@pytest.mark.parametrize(("query", "response"), [
    ("Generate a list of five new countries which could host the 2026 World Cup.",
     "Can you come up with enumerate of five new countries which could host 2026 World Cup?"),
    ("Explain the significance of the provided historical event.",
     "Hi! I need some help. Clarify significance of provided historical event."),
])
def test_a_reworded_question_carrying_the_response_is_not_paid(query: str, response: str) -> None:
    assert "restate" in reasons(query, response)


@pytest.mark.parametrize(("query", "response"), [
    ('Explain the meaning of the phrase "actions speak louder than words".',
     'The phrase "actions speak louder than words" means that words without corresponding action are not '
     "as meaningful or effective. It suggests that it is better to demonstrate what you believe with your "
     "behavior, rather than just talking about it."),
    ("Create a question about the consequences of global warming.",
     "What are the potential consequences of global warming?"),
])
def test_an_answer_in_the_questions_words_is_paid(query: str, response: str) -> None:
    assert reasons(query, response) == set()


def test_filler_is_marked_only_where_the_head_says_so() -> None:
    response = f"{ANSWER} I hope this helps!"
    flags = [False] * (len(tokenise(response).sentences) - 1) + [True]
    assert reasons(QUERY, response) == set()  # no head: the pure-Python detectors alone
    detection = detect(QUERY, tokenise(response), None, flags)
    assert set(r for r in detection.unpaid if r) == {"filler"} and detection.paid_text() == ANSWER


def test_a_weaker_sentence_is_padding_only_beside_padding() -> None:
    assert filler_flags([0.6, 0.35, None, 0.4, 0.1], 0.5, 0.2) == [True, True, False, False, False]
    assert filler_flags([0.35, 0.31, 0.9, 0.2], 0.5, 0.2) == [True, True, True, False]
    assert filler_flags([0.45, 0.45], 0.5, 0.2) == [False, False]  # no run without a sure one
    assert filler_flags([0.45, 0.9], 0.5, 0.0) == [False, True]


def test_the_guarded_reward_never_pays_for_unpaid_text() -> None:
    params = GuardParams()
    clean, padded = detect(QUERY, tokenise(ANSWER)), detect(QUERY, tokenise(f"{ANSWER}\n{ANSWER}"))
    assert guarded_reward(1.0, clean, params) == 1.0
    assert guarded_reward(1.0, padded, params) < 1.0
    assert guarded_reward(-1.0, padded, params) < -1.0  # a negative reward is not pulled up either


@pytest.fixture(scope="module")
def head_and_model():
    from r3_service.models.embedding import EmbeddingModel

    head = FillerHead.load()
    return head, EmbeddingModel(head.model, device="cpu")


def test_the_head_calls_padding_it_never_saw_filler_and_answers_not(head_and_model) -> None:
    head, model = head_and_model
    held_out = [s for style in FILLER_STYLES.values() for s in style]
    assert not set(held_out) & set(TRAINING_FILLER)
    records = json.loads(DATA.read_text())[-200:]
    honest = [s for r in records for s in tokenise(r["output"].strip()).sentence_texts()][:400]
    p_filler = head.probability(model.embed(held_out))
    p_honest = head.probability(model.embed(honest))
    assert (p_filler >= head.threshold).float().mean() >= 0.75
    assert (p_honest >= head.threshold).float().mean() <= 0.05
    assert torch.all((p_honest >= 0) & (p_honest <= 1))
    # The prefilter (word vectors, no encoder pass) lets all of that padding through, and drops
    # most honest sentences before they cost an embedding.
    assert head.prefilter is not None
    passed_filler = head.prefilter.probability(model.word_vectors(held_out)) >= head.prefilter_threshold
    passed_honest = head.prefilter.probability(model.word_vectors(honest)) >= head.prefilter_threshold
    assert bool(passed_filler.all())
    assert passed_honest.float().mean() <= 0.5


def test_the_guarded_preset_ranks_the_answer_above_its_hacks(app_client) -> None:
    closer = f"{ANSWER} I hope this helps! Let me know if you have any other questions. Have a great day!"
    hacks = [QUERY, f"{QUERY}\n\n{ANSWER}", f"{ANSWER}\n{ANSWER}", closer, pad(ANSWER, "preamble", QUERY),
             reword(QUERY)]
    items = [{"query": QUERY, "response": r, "query_type": "open"} for r in [ANSWER, *hacks]]
    guarded = app_client.post("/reward", json={"items": items, "backend": "r3-guarded",
                                               "return_components": True}).json()
    r3 = app_client.post("/reward", json={"items": items, "backend": "r3"}).json()["rewards"]
    rewards = guarded["rewards"]
    assert rewards[0] == pytest.approx(r3[0], rel=1e-5)  # an honest answer: R3's reward
    assert all(rewards[0] > other for other in rewards[1:]), rewards
    assert sum(r3[0] > other for other in r3[1:]) <= 3  # while R3 pays for most of them
    parts = guarded["components"]
    assert parts[0]["unpaid"] == {"echo": 0, "input_echo": 0, "restate": 0, "repeat": 0, "filler": 0}
    assert parts[1]["unpaid"]["echo"] == 1 and parts[3]["unpaid"]["repeat"] == pytest.approx(0.5, abs=0.05)
    assert parts[4]["unpaid"]["filler"] > 0.2 and parts[5]["unpaid"]["filler"] > 0.2
    # Relevance is read again on the paid text (here the answer itself) where the cut moves it.
    r3_parts = app_client.post("/reward", json={"items": items, "backend": "r3",
                                                "return_components": True}).json()["components"]
    for hack in (2, 4):  # the question pasted before the answer; three closers after it
        assert parts[hack]["relevance"] == pytest.approx(r3_parts[0]["relevance"], abs=1e-6)
    assert r3_parts[2]["relevance"] > r3_parts[0]["relevance"]  # the pasted question had lifted R3's S


def test_only_short_sentences_that_name_nothing_go_to_the_filler_head() -> None:
    from r3_service.rule.guards import may_be_filler

    padding = [s for style in FILLER_STYLES.values() for s in style] + list(TRAINING_FILLER)
    sentences = [tokens for s in padding for tokens in tokenise(s).sentence_tokens()]
    assert sum(map(may_be_filler, sentences)) == len(sentences) - 1  # all but "As an AI, ..."
    assert not may_be_filler(word_tokens("Paris has been the capital of France since 987."))
    assert not may_be_filler(word_tokens("It was founded by Ada Lovelace."))
    assert not may_be_filler(word_tokens(ANSWER + " " + ANSWER))  # over 30 word tokens
    assert may_be_filler(word_tokens("I hope this helps!"))
    assert not may_be_filler(word_tokens("..........."))  # no word, nothing to read


def test_padding_run_on_from_a_line_without_a_full_stop_is_read_on_its_own() -> None:
    title = "Dressed for Success: The Latest Looks in Fashion"
    text = tokenise(f"{title} It should be noted that opinions may vary.")
    assert len(text.sentences) == 1
    (unit,) = filler_units(text)
    assert unit is not None and text.piece(unit) == "It should be noted that opinions may vary."
    detection = detect("Write a headline about fashion.", text, None, [True])
    assert detection.paid_text() == title
    # a sentence that may be padding is read whole; a name with no padding after it, not at all
    assert filler_units(tokenise("I hope this helps!")) == [[0, 1, 2, 3, 4]]
    assert filler_units(tokenise("It was founded by Ada Lovelace in Paris.")) == [None]


def test_one_split_of_a_response_serves_the_rule_the_detectors_and_the_metrics(app_client) -> None:
    responses = [f"{ANSWER} Note {n}: it depends on the data and the task." for n in range(3)]
    items = [{"query": QUERY, "response": r, "query_type": "open"} for r in responses]
    tokenise.cache.clear()
    got = app_client.post("/reward", json={"items": items, "backend": "r3-guarded"})
    assert got.status_code == 200
    cache = tokenise.cache
    # each distinct response split once; the rule's features and /metrics read that split again
    assert cache.misses == len(responses) and cache.hits >= 2 * len(responses)
