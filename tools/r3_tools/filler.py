"""Train the filler head (`models/filler_head.json`): generic padding sentences against the
sentences of honest answers.

Positives: `TRAINING_FILLER` below (nine kinds of padding: generic statements, closers, openers,
disclaimers, empathy, meta-talk, hedges, encouragement, empty transitions). Negatives: every
sentence of the reference answers of the design fold (`design_rows`: the strict split's first
fold, each leading word's queries in one fold). The validation fold and the audit's held-out
filler sentences (`hacks.FILLER_STYLES`) are never seen here, so the audit measures the head on
padding it was not fitted to. Two stages are fitted: the head over sentence embeddings, and its
prefilter over word-piece vectors (`EmbeddingModel.word_vectors`); each one's threshold by
leave-one-category-out.

    python -m r3_tools.filler [--data data/alpacafarm_val.json] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from r3_service.models.embedding import EmbeddingModel
from r3_service.models.filler import HEAD_PATH, FillerHead, Linear
from r3_service.rule.features import clean_response
from r3_service.rule.guards import tokenise
from r3_service.settings import DEFAULT_MODEL
from r3_tools.audit import FILLER
from r3_tools.heads import _logistic_regression
from r3_tools.qtype_splits import grouped_folds

DATA = Path("data/alpacafarm_val.json")
L2 = 1e-3
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
LOCO_FLOOR = 0.75
PREFILTER_FLOOR = 0.8  # stricter than the head's: what the prefilter drops the head never sees
FILLER_CATEGORIES: dict[str, tuple[str, ...]] = {
    "generic": (  # generic statements: the audit's filler-2x sentences, and more
        *FILLER,
        "There is no single right answer to this.",
        "Everyone's experience is a little bit different.",
        "It really depends on a number of different things.",
        "This topic has been discussed for a long time.",
        "There are pros and cons to every approach.",
        "Things are not always as simple as they seem.",
        "It is a complex issue with many sides to it.",
        "The details can vary quite a bit from case to case.",
    ),
    "closers": (  # closers
        "I hope this helps!",
        "Let me know if you have any other questions.",
        "Feel free to reach out anytime if you need more help.",
        "Have a wonderful day!",
        "I hope you found this information useful.",
        "Please don't hesitate to ask if anything is unclear.",
        "Good luck with everything!",
        "Thanks for reading, and take care.",
        "I'm always here if you need anything else.",
        "Let me know if you would like more details.",
        "Hope that answers your question!",
        "Best of luck to you!",
    ),
    "openers": (  # openers and talk about the answer
        "Sure, I can help with that.",
        "Of course! Here is my answer.",
        "Absolutely, let me explain.",
        "That's a really interesting question.",
        "Thanks for your question.",
        "I'd be glad to help with this.",
        "Here is what I think about it.",
        "Let me walk you through it.",
        "Certainly, here you go.",
        "What a thoughtful thing to ask.",
        "I understand why you are asking this.",
        "Let's take a look at this together.",
    ),
    "disclaimers": (  # disclaimers
        "As an AI, I don't have personal opinions on this.",
        "Please note that this is not professional advice.",
        "I may not have all the details, so take this with a grain of salt.",
        "Information can change over time, so double-check before relying on it.",
        "I'm not an expert, but I will do my best.",
        "You may want to consult a specialist for your specific case.",
    ),
    "empathy": (  # empathy and encouragement
        "I understand how you feel about this.",
        "It's completely normal to have questions like this.",
        "You're doing great by looking into it.",
        "Don't worry, many people wonder about the same thing.",
        "Believe in yourself and you can do it!",
        "Take your time and be patient with yourself.",
    ),
    "meta": (  # talk about the answer itself, not about the question
        "This answer tries to cover everything that matters.",
        "The explanation above should make things clearer.",
        "I have done my best to keep this accurate and easy to follow.",
        "The information here is thorough and reliable.",
        "This reply was put together carefully to be as useful as possible.",
        "The points above sum it up nicely.",
        "Hopefully this gives a complete picture.",
        "I made sure to include all the important details.",
    ),
    "hedges": (  # hedges that commit to nothing
        "Of course, results may differ for different people.",
        "Keep in mind that there are always exceptions.",
        "Naturally, what is right for one person may not be right for another.",
        "That said, nothing is ever set in stone.",
        "Individual circumstances can change the picture quite a bit.",
        "Your mileage may vary, of course.",
    ),
    "encouragement": (  # motivational closers
        "Stay positive and keep going!",
        "You've got this!",
        "Never stop exploring and growing.",
        "With a little effort, anything is possible.",
        "Every step forward counts, so keep at it.",
        "Enjoy the journey and have fun along the way!",
    ),
    "transitions": (  # transitions that say nothing
        "With that being said, let's move on.",
        "All things considered, that is the general idea.",
        "To put it simply, it is what it is.",
        "At the end of the day, it all comes down to what matters most.",
        "In other words, there is more to it than meets the eye.",
        "So there you have it.",
    ),
}
TRAINING_FILLER = tuple(s for group in FILLER_CATEGORIES.values() for s in group)


def design_rows(queries: list[str]) -> list[int]:
    """The design fold: the strict split's first of two folds (grouped by leading word)."""
    return grouped_folds(queries, 2)[0]


def honest_sentences(path: Path) -> list[str]:
    records = json.loads(path.read_text(encoding="utf-8"))
    queries = [r["input"] for r in records]
    out: list[str] = []
    for row in design_rows(queries):
        out += tokenise(clean_response(records[row]["output"])).sentence_texts()
    return list(dict.fromkeys(out))


def _fit(negatives: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logistic regression, each class weighing as much as the other whatever their sizes."""
    x = torch.cat([negatives, positives])
    y = torch.tensor([0.0] * len(negatives) + [1.0] * len(positives))
    weight = torch.where(y > 0, len(y) / (2 * len(positives)), len(y) / (2 * len(negatives)))
    return _logistic_regression(x, y, L2, weight)


def leave_one_category_out(negatives: torch.Tensor, positives: torch.Tensor,
                           categories: list[str]) -> dict[str, dict[str, float]]:
    """How the head does on padding of a kind it never saw: fitted without one category (and on
    half the honest sentences), the share of that category's sentences at or over each threshold,
    and of the other half's honest sentences (false positives). The shipped threshold is the
    highest at which every left-out category keeps LOCO_FLOOR of its sentences."""
    half = torch.arange(len(negatives)) % 2 == 0
    out: dict[str, dict[str, float]] = {}
    for held in dict.fromkeys(categories):
        kept = torch.tensor([c != held for c in categories])
        weights, bias = _fit(negatives[half], positives[kept])
        p_held = torch.sigmoid(positives[~kept] @ weights + bias)
        p_honest = torch.sigmoid(negatives[~half] @ weights + bias)
        out[held] = {**{f"caught@{t:g}": float((p_held >= t).float().mean()) for t in THRESHOLDS},
                     **{f"honest@{t:g}": float((p_honest >= t).float().mean()) for t in THRESHOLDS}}
    return out


def pick_threshold(loco: dict[str, dict[str, float]], floor: float = LOCO_FLOOR) -> float:
    return max((t for t in THRESHOLDS if all(row[f"caught@{t:g}"] >= floor for row in loco.values())),
               default=min(THRESHOLDS))


def _stage(honest: torch.Tensor, padding: torch.Tensor, categories: list[str],
           floor: float) -> tuple[Linear, dict[str, dict[str, float]], float]:
    loco = leave_one_category_out(honest, padding, categories)
    weights, bias = _fit(honest, padding)
    return Linear(weights, bias), loco, pick_threshold(loco, floor)


def train(path: Path, model_name: str = DEFAULT_MODEL) -> FillerHead:
    """The head over sentence embeddings, and its prefilter over word vectors; each one's
    threshold by leave-one-category-out."""
    negatives = honest_sentences(path)
    categories = [name for name, group in FILLER_CATEGORIES.items() for _ in group]
    model = EmbeddingModel(model_name, device="cpu")
    texts = [*negatives, *TRAINING_FILLER]
    stages = {}
    for name, features, floor in (("head", model.embed(texts), LOCO_FLOOR),
                                  ("prefilter", model.word_vectors(texts), PREFILTER_FLOOR)):
        x = torch.nn.functional.normalize(features, dim=-1)
        stages[name] = _stage(x[:len(negatives)], x[len(negatives):], categories, floor)
    head, loco, threshold = stages["head"]
    prefilter, prefilter_loco, prefilter_threshold = stages["prefilter"]
    return FillerHead(model_name, head, prefilter, {
        "data": str(path), "fold": "design (grouped_folds(queries, 2)[0])", "negatives": len(negatives),
        "positives": len(TRAINING_FILLER), "l2": L2, "leave_one_category_out": loco,
        "threshold": threshold, "loco_floor": LOCO_FLOOR,
        "prefilter_leave_one_category_out": prefilter_loco, "prefilter_threshold": prefilter_threshold,
        "prefilter_floor": PREFILTER_FLOOR})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_tools.filler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HEAD_PATH)
    args = parser.parse_args(argv)
    head = train(args.data)
    head.save(args.out)
    print(f"wrote {args.out} ({head.meta['negatives']} honest sentences, {head.meta['positives']} filler); "
          f"thresholds by leave-one-category-out: head {head.threshold}, "
          f"prefilter {head.prefilter_threshold}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
