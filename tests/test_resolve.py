"""`Resolver` alone, with a fake store and a fake classifier that record every call: where an
item's query type and reference come from (the request, else the store, else the classifier,
else the default), what is looked up and written back, and how responses are cleaned."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from r3_service.engine.resolve import RawItem, Resolver
from r3_service.qtype.base import Label
from r3_service.rule.datasets import QueryRecord
from r3_service.rule.querytypes import QueryType
from r3_service.rule.reward import ResolvedItem
from r3_service.store.records import text_key


@dataclass
class FakeStore:
    """Records by key; every get_many and put_many call is kept."""

    records: dict[str, QueryRecord] = field(default_factory=dict)
    gets: list[list[str]] = field(default_factory=list)
    puts: list[list[tuple[str, str, QueryRecord]]] = field(default_factory=list)

    async def get_many(self, keys: Sequence[str]) -> list[QueryRecord | None]:
        self.gets.append(list(keys))
        return [self.records.get(key) for key in keys]

    async def put_many(self, records: Sequence[tuple[str, str, QueryRecord]]) -> None:
        self.puts.append(list(records))
        self.records |= {key: record for key, _, record in records}


@dataclass
class FakeClassifier:
    """Answers `closed` for queries with a question mark, else `open`; or fails."""

    name: str = "fake"
    version: str = "2"
    fails: bool = False
    fallback: FakeClassifier | None = None
    sureness: float | None = None  # when set, each answer's probability: p(open) = this or 1 - this
    calls: list[list[str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    async def label(self, queries: Sequence[str]) -> list[Label]:
        self.calls.append(list(queries))
        if self.fails:
            raise RuntimeError("the classifier is down")
        return [self._label(query) for query in queries]

    def _label(self, query: str) -> Label:
        closed = "?" in query
        if self.sureness is None:
            return Label("closed" if closed else "open", self.id)
        return Label("closed" if closed else "open", self.id, 1 - self.sureness if closed else self.sureness)


def resolver(store: FakeStore, classifier: FakeClassifier | None = None, *,
             default: QueryType = "open", stop_strings: tuple[str, ...] | None = ("STOP",)) -> Resolver:
    return Resolver(store, classifier, default_query_type=default, stop_strings=stop_strings)  # type: ignore[arg-type]


def sources(resolved: list[ResolvedItem]) -> list[tuple[str, str, str | None, str | None]]:
    return [(r.query_type, r.query_type_source, r.reference, r.reference_source) for r in resolved]


async def test_an_item_with_its_own_type_and_reference_is_never_looked_up() -> None:
    store = FakeStore({text_key("Capital of France?"): QueryRecord("open", "Lyon.")})
    classifier = FakeClassifier()
    got = await resolver(store, classifier).resolve(
        [RawItem("Capital of France?", "Paris.", reference="Paris.", query_type="closed")])
    assert sources(got) == [("closed", "request", "Paris.", "request")]
    assert store.gets == [] and store.puts == [] and classifier.calls == []


async def test_the_store_types_a_query_as_cache_or_classifier_and_gives_its_reference() -> None:
    labelled, classified = "Name a primary colour", "Write a poem"
    store = FakeStore({text_key(labelled): QueryRecord("closed", "Red."),  # a data set's label
                       text_key(classified): QueryRecord("open", None, "fake@2")})  # the current classifier's
    classifier = FakeClassifier()
    got = await resolver(store, classifier).resolve([RawItem(labelled, "Blue."),
                                                     RawItem(classified, "Roses.")])
    assert sources(got) == [("closed", "cache", "Red.", "cache"), ("open", "classifier", None, None)]
    assert store.gets == [sorted([text_key(labelled), text_key(classified)])]
    assert classifier.calls == [] and store.puts == []


async def test_the_request_overrides_the_store_field_by_field() -> None:
    query = "Name a primary colour"
    store = FakeStore({text_key(query): QueryRecord("closed", "Red.")})
    got = await resolver(store, FakeClassifier()).resolve([
        RawItem(query, "Blue.", query_type="open"),  # type from the request, reference still looked up
        RawItem(query, "Blue.", reference="Blue."),  # reference from the request, type from the store
        RawItem(query, "Blue.", reference="  \n", query_type="open"),  # a blank reference is none
    ])
    assert sources(got) == [("open", "request", "Red.", "cache"), ("closed", "cache", "Blue.", "request"),
                            ("open", "request", "Red.", "cache")]
    assert store.gets == [[text_key(query)]]  # one lookup of the one distinct key


async def test_unknown_queries_are_classified_once_each_and_written_back_under_their_key() -> None:
    store, classifier = FakeStore(), FakeClassifier()
    templated = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    items = [RawItem("Write a poem", "Roses."), RawItem(templated, "4."), RawItem("What is 2+2?", "Four."),
             RawItem("Write  a\npoem", "Violets."), RawItem("Write a poem", "x", query_type="closed")]
    got = await resolver(store, classifier).resolve(items)
    assert sources(got) == [("open", "classifier", None, None), ("closed", "classifier", None, None),
                            ("closed", "classifier", None, None), ("open", "classifier", None, None),
                            ("closed", "request", None, None)]
    # One call, each distinct query once (chat template removed, whitespace collapsed), as first seen.
    assert classifier.calls == [["Write a poem", "What is 2+2?"]]
    looked_up = store.gets[0]
    assert looked_up == sorted({text_key("Write a poem"), text_key("What is 2+2?")})
    assert store.puts == [[(text_key("Write a poem"), "Write a poem", QueryRecord("open", None, "fake@2")),
                           (text_key("What is 2+2?"), "What is 2+2?", QueryRecord("closed", None, "fake@2"))]]
    assert {key for key, _, _ in store.puts[0]} <= set(looked_up)

    again = await resolver(store, classifier).resolve(items)  # now answered by the store
    assert sources(again) == sources(got) and len(classifier.calls) == 1 and len(store.puts) == 1


async def test_a_stale_classifier_answer_is_classified_again_keeping_the_stored_reference() -> None:
    stale, by_fallback = "Name three primary colours?", "Describe your ideal weekend"
    store = FakeStore({text_key(stale): QueryRecord("open", "Red.", "fake@1"),
                       text_key(by_fallback): QueryRecord("closed", None, "rules@7")})
    classifier = FakeClassifier(fallback=FakeClassifier("rules", "7"))
    got = await resolver(store, classifier).resolve([RawItem(stale, "Red, yellow, blue."),
                                                     RawItem(by_fallback, "Hiking.")])
    assert sources(got) == [("closed", "classifier", "Red.", "cache"), ("closed", "classifier", None, None)]
    assert classifier.calls == [[stale]]  # the fallback's answer is a current one
    assert store.puts == [[(text_key(stale), stale, QueryRecord("closed", "Red.", "fake@2"))]]


async def test_the_classifiers_probability_is_written_back_and_kept_only_with_its_type() -> None:
    labelled, stored = "Name a primary colour", "Write a poem"
    store = FakeStore({text_key(labelled): QueryRecord("closed", "Red."),  # a data set's label
                       text_key(stored): QueryRecord("open", None, "fake@2", 0.75)})
    classifier = FakeClassifier(sureness=0.9)
    got = await resolver(store, classifier).resolve([
        RawItem("What is 2+2?", "4."), RawItem(stored, "Roses."), RawItem(labelled, "Blue."),
        RawItem(stored, "Roses.", query_type="closed")])
    assert [(r.query_type_source, r.open_probability) for r in got] == [
        ("classifier", pytest.approx(0.1)), ("classifier", 0.75), ("cache", None), ("request", None)]
    assert store.puts == [[(text_key("What is 2+2?"), "What is 2+2?",
                            QueryRecord("closed", None, "fake@2", pytest.approx(0.1)))]]


async def test_without_a_classifier_or_without_classifying_the_default_type_is_used() -> None:
    items = [RawItem("Write a poem", "Roses."), RawItem("What is 2+2?", "4.", reference="4")]
    for classifier, classify in ((None, True), (FakeClassifier(), False)):
        store = FakeStore()
        got = await resolver(store, classifier, default="closed").resolve(items, classify=classify)
        assert sources(got) == [("closed", "default", None, None), ("closed", "default", "4", "request")]
        assert len(store.gets) == 1 and store.puts == []
        assert classifier is None or classifier.calls == []


async def test_a_failing_classifier_falls_back_to_the_default_type(caplog: pytest.LogCaptureFixture) -> None:
    store, classifier = FakeStore(), FakeClassifier(fails=True)
    with caplog.at_level(logging.ERROR, logger="r3_service.engine.resolve"):
        got = await resolver(store, classifier, default="closed").resolve([RawItem("Write a poem", "Roses.")])
    assert sources(got) == [("closed", "default", None, None)]
    assert classifier.calls == [["Write a poem"]] and store.puts == []
    assert "classifier failed on 1 queries" in caplog.text


@pytest.mark.parametrize(("stop_strings", "item_stops", "response", "expected"), [
    (("STOP",), (), "  An answer. STOP then more\n", "An answer."),
    (("STOP", "###"), (), "One ### two STOP three", "One"),  # the earliest stop string cuts
    (("STOP",), ("USER:",), "Hi. USER: and I speak for the user", "Hi."),  # the item's own stop strings
    (("STOP",), (), "\n\nno stop string here  ", "no stop string here"),
    (None, ("USER:",), "  An answer. STOP USER: more\n", "An answer. STOP USER: more"),  # only stripped
])
async def test_responses_are_cut_at_stop_strings(stop_strings: tuple[str, ...] | None,
                                                 item_stops: tuple[str, ...], response: str,
                                                 expected: str) -> None:
    item = RawItem("q", response, reference="r", query_type="open", stop_strings=item_stops)
    (got,) = await resolver(FakeStore(), stop_strings=stop_strings).resolve([item])
    assert got.response == expected
