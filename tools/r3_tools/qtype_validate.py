"""Cross-validation of the learned query-type head's training recipe, random and strict
(`qtype_splits`), with calibration (temperature scaling, a reliability diagram) and the soft
branch's reward error: `r3-qtypes eval DATA --strict`. `r3-qtypes train` uses the same pieces
to pick its L2 strength and temperature on the strict split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from r3_service.engine.backends import rule_params
from r3_service.models.embedding import EmbeddingModel, Pooling
from r3_service.qtype.base import split_query
from r3_service.qtype.learned import LinearHead
from r3_service.rule.querytypes import QueryType
from r3_service.rule.reward import PRESETS, ResolvedItem, score
from r3_service.rule.templates import normalise_query
from r3_service.settings import R3BackendSpec, Settings
from r3_tools.heads import fit_head, fit_temperature
from r3_tools.qtype_splits import AUGMENTATIONS, STRICT_VARIANTS, VARIANTS, grouped_folds, random_folds

SPLITS: dict[str, Callable[[Sequence[str], int], list[list[int]]]] = {
    "random": random_folds, "grouped by leading word": grouped_folds}
STRICT_SPLIT = "grouped by leading word"
SOFT_BANDS = ((0.4, 0.6), (0.3, 0.7), (0.2, 0.8), (0.1, 0.9), (0.0, 1.0))
RELIABILITY_BINS = 10


class TextEmbedder:
    """Embeddings through one view of a model, each distinct text embedded once (variants,
    augmentations and references repeat)."""

    def __init__(self, model: EmbeddingModel, pooling: Pooling = "mean",
                 views: dict[str, TextEmbedder] | None = None) -> None:
        self.model = model.view(pooling)
        self.pooling = pooling
        self.name = model.info.model
        self.normalize = model.info.normalize
        self._rows: dict[str, torch.Tensor] = {}
        self._views = views if views is not None else {}  # every pooling's embedder, shared
        self._views[pooling] = self

    def view(self, pooling: Pooling) -> TextEmbedder:
        """The embedder of another pooling of the same model, made once: each fold and recipe
        then reuses what the others embedded."""
        return self._views.get(pooling) or TextEmbedder(self.model, pooling, self._views)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [text for text in dict.fromkeys(texts) if text not in self._rows]
        if missing:
            rows = self.model.embed([normalise_query(text) for text in missing])
            self._rows.update(zip(missing, rows, strict=True))
        if not texts:
            return torch.empty(0, self.model.info.dim)
        return torch.stack([self._rows[text] for text in texts])


@dataclass(frozen=True)
class Recipe:
    """How a head is trained: regularisation, rare-feature cut, and whether the training rows are
    augmented with rewritten copies (`qtype_splits.AUGMENTATIONS`)."""

    l2: float
    min_count: int = 1
    augment: bool = True
    pooling: Pooling = "layers"


def augmented(queries: Sequence[str], targets: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The rows and, per augmentation, the rewritten copies that differ from their original."""
    texts, labels = list(queries), [targets]
    for rewrite in AUGMENTATIONS.values():
        rows = [(i, rewrite(query)) for i, query in enumerate(queries)]
        rows = [(i, text) for i, text in rows if text != queries[i]]
        texts += [text for _, text in rows]
        labels.append(targets[[i for i, _ in rows]])
    return texts, torch.cat(labels)


def fit_recipe(queries: Sequence[str], targets: torch.Tensor, embed: TextEmbedder, recipe: Recipe,
               meta: dict[str, object] | None = None) -> LinearHead:
    texts, labels = augmented(queries, targets) if recipe.augment else (list(queries), targets)
    embed = embed.view(recipe.pooling)
    return fit_head(texts, labels, embed(texts), model=embed.name, l2=recipe.l2,
                    min_count=recipe.min_count, meta=meta, pooling=recipe.pooling)


def out_of_fold_logits(queries: Sequence[str], targets: torch.Tensor, folds: list[list[int]],
                       embed: TextEmbedder, recipe: Recipe,
                       variants: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per variant, each query's logit from the head trained without its fold."""
    out = {variant: torch.zeros(len(queries)) for variant in variants}
    for fold in folds:
        held = set(fold)
        train = [i for i in range(len(queries)) if i not in held]
        head = fit_recipe([queries[i] for i in train], targets[train], embed, recipe)
        view = embed.view(recipe.pooling)
        for variant in variants:
            texts = [VARIANTS[variant](queries[i]) for i in fold]
            out[variant][fold] = head.logits(texts, view(texts))
    return out


def strict_logits(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, row index) of the strict variants stacked: each query counts once per variant."""
    logits = torch.cat([out[variant] for variant in STRICT_VARIANTS])
    rows = torch.arange(len(out[STRICT_VARIANTS[0]])).repeat(len(STRICT_VARIANTS))
    return logits, rows


def accuracy(correct: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error) of per-query scores in [0, 1]."""
    n = correct.numel()
    mean = correct.float().mean().item()
    se = correct.float().std().item() / math.sqrt(n) if n > 1 else float("nan")
    return mean, se


def strict_accuracy(out: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[float, float]:
    """Accuracy over the strict variants; a query's score is its mean over them, so the standard
    error counts queries, not rewrites."""
    per_query = torch.stack([((out[v] > 0).float() == targets).float() for v in STRICT_VARIANTS]).mean(0)
    return accuracy(per_query)


def choose_recipe(queries: Sequence[str], targets: torch.Tensor, embed: TextEmbedder, l2s: Sequence[float],
                  *, folds: int, min_count: int, augment: bool, pooling: Pooling,
                  log: Callable[[str], None] = print) -> tuple[Recipe, float, float]:
    """(best recipe, its strict accuracy, its temperature) by grouped cross-validation."""
    split = grouped_folds(queries, folds)
    best: tuple[Recipe, float, float] | None = None
    for l2 in l2s:
        recipe = Recipe(l2, min_count, augment, pooling)
        out = out_of_fold_logits(queries, targets, split, embed, recipe, STRICT_VARIANTS)
        mean, se = strict_accuracy(out, targets)
        log(f"  l2={l2:g}: strict accuracy {mean:.4f} ± {se:.4f}")
        if best is None or mean > best[1]:
            logits, rows = strict_logits(out)
            best = (recipe, mean, fit_temperature(logits, targets[rows]))
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# calibration


def cross_fitted_probabilities(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                               folds: list[list[int]]) -> tuple[torch.Tensor, list[float]]:
    """p(open) per logit, each with the temperature fitted on the other folds' queries, so the
    reliability diagram shows calibration on queries the temperature never saw."""
    fold_of = torch.empty(int(rows.max()) + 1, dtype=torch.long)
    for index, fold in enumerate(folds):
        fold_of[fold] = index
    probabilities = torch.zeros_like(logits)
    temperatures = []
    for index in range(len(folds)):
        inside = fold_of[rows] == index
        temperature = fit_temperature(logits[~inside], targets[~inside])
        temperatures.append(temperature)
        probabilities[inside] = torch.sigmoid(logits[inside] / temperature)
    return probabilities, temperatures


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int
    mean_probability: float  # mean predicted p(open)
    open_share: float  # share of the bin GPT-4 labelled open


def reliability(probabilities: torch.Tensor, targets: torch.Tensor,
                bins: int = RELIABILITY_BINS) -> list[Bin]:
    index = (probabilities * bins).long().clamp(max=bins - 1)
    out = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        out.append(Bin(b / bins, (b + 1) / bins, count,
                       probabilities[inside].mean().item() if count else float("nan"),
                       targets[inside].float().mean().item() if count else float("nan")))
    return out


def expected_calibration_error(table: list[Bin]) -> float:
    total = sum(b.count for b in table)
    return sum(b.count * abs(b.mean_probability - b.open_share) for b in table if b.count) / total


def plot_reliability(tables: dict[str, list[Bin]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for (label, table), marker in zip(tables.items(), "os^", strict=False):
        shown = [b for b in table if b.count]
        axis.plot([b.mean_probability for b in shown], [b.open_share for b in shown], marker=marker,
                  label=f"{label} (ECE {expected_calibration_error(table):.3f})")
    axis.set_xlabel("predicted p(open)")
    axis.set_ylabel("share labelled open by GPT-4")
    axis.set_title("Query-type calibration, strict validation")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# soft branch


@dataclass(frozen=True)
class BranchError:
    band: str  # "hard" or "lo–hi"
    blended_share: float  # share of items whose reward blends both branches
    mean_abs_error: float
    rms_error: float
    mean_error: float  # signed: reward minus the reward under the GPT-4 label


def soft_branch_errors(queries: Sequence[str], responses: Sequence[str], references: Sequence[str],
                       labels: Sequence[QueryType], probabilities: torch.Tensor, embed: TextEmbedder,
                       bands: Sequence[tuple[float, float]] = SOFT_BANDS) -> list[BranchError]:
    """Reward error against the reward under the GPT-4 label: the hard branch (the classifier's
    type) and each band of the soft branch, through the service's own rule and parameters."""
    embed = embed.view("mean")  # relevance reads the sentence embedding, whatever the head reads
    s_query = (embed(queries) * embed(responses)).sum(-1).tolist()
    s_reference = (embed(references) * embed(responses)).sum(-1).tolist()
    settings = Settings()
    preset = PRESETS["r3"]

    def rewards(band: tuple[float, float] | None, typed: Callable[[int], tuple[QueryType, float | None]]
                ) -> tuple[list[float], int]:
        spec = R3BackendSpec(preset="r3", soft_branch=band)
        params = rule_params(spec, settings.model_copy(update={"soft_branch": None}), embed.normalize)
        out, blended = [], 0
        for i, query in enumerate(queries):
            query_type, p = typed(i)
            item = ResolvedItem(query, responses[i], references[i], query_type, "classifier", "request", p)
            s, s_other = ((s_reference[i], s_query[i]) if query_type == "closed"
                          else (s_query[i], s_reference[i]))
            scored = score(preset, item, s, params, s_other)
            out.append(scored.reward)
            blended += scored.open_branch_weight is not None
        return out, blended

    p = probabilities.tolist()
    truth, _ = rewards(None, lambda i: (labels[i], None))

    def predicted(i: int) -> tuple[QueryType, float | None]:
        return "open" if p[i] > 0.5 else "closed", p[i]

    out = []
    for band in (None, *bands):
        got, blended = rewards(band, predicted)
        errors = torch.tensor(got) - torch.tensor(truth)
        out.append(BranchError("hard" if band is None else f"{band[0]:g}–{band[1]:g}",
                               blended / len(queries), errors.abs().mean().item(),
                               errors.square().mean().sqrt().item(), errors.mean().item()))
    return out


# ---------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class SplitResult:
    split: str
    variant: str
    accuracy: float
    se: float


@dataclass(frozen=True)
class StrictReport:
    data: str
    queries: int
    folds: int
    recipe: Recipe
    results: list[SplitResult]
    strict: tuple[float, float]
    by_input: dict[str, tuple[int, float, float]]  # with / without an input section: (n, acc, se)
    temperatures: list[float]
    reliability: dict[str, list[Bin]]  # "uncalibrated", "calibrated"
    soft_branch: dict[str, list[BranchError]]  # responses name → errors

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def run_strict(data_name: str, queries: list[str], targets: torch.Tensor, references: list[str | None],
               embed: TextEmbedder, recipe: Recipe, folds: int,
               responses: dict[str, list[str]] | None = None) -> StrictReport:
    """Cross-validate `recipe` on random and grouped folds over every variant, calibrate on the
    grouped out-of-fold logits, and measure the soft branch on the strict variants."""
    results = []
    grouped: dict[str, torch.Tensor] = {}
    for split_name, make in SPLITS.items():
        out = out_of_fold_logits(queries, targets, make(queries, folds), embed, recipe, list(VARIANTS))
        for variant, logits in out.items():
            results.append(SplitResult(split_name, variant, *accuracy((logits > 0).float() == targets)))
        if split_name == STRICT_SPLIT:
            grouped = out
    has_input = torch.tensor([bool(split_query(query)[1]) for query in queries])
    written = (grouped["as written"] > 0).float() == targets
    by_input = {name: (int(mask.sum()), *accuracy(written[mask]))
                for name, mask in (("with input", has_input), ("without input", ~has_input)) if mask.any()}
    logits, rows = strict_logits(grouped)
    probabilities, temperatures = cross_fitted_probabilities(logits, targets[rows], rows,
                                                             grouped_folds(queries, folds))
    tables = {"uncalibrated": reliability(torch.sigmoid(logits), targets[rows]),
              "calibrated": reliability(probabilities, targets[rows])}
    soft = _soft_branch(queries, targets, references, rows, probabilities, embed, responses or {})
    return StrictReport(data_name, len(queries), folds, recipe, results, strict_accuracy(grouped, targets),
                        by_input, temperatures, tables, soft)


def _soft_branch(queries: list[str], targets: torch.Tensor, references: list[str | None], rows: torch.Tensor,
                 probabilities: torch.Tensor, embed: TextEmbedder,
                 responses: dict[str, list[str]]) -> dict[str, list[BranchError]]:
    """Errors per response set: the references themselves, and each given set of real answers."""
    variant_texts = [VARIANTS[variant](query) for variant in STRICT_VARIANTS for query in queries]
    sets = {"reference as response": [references[i] for i in rows.tolist()]}
    sets |= {name: [answers[i] for i in rows.tolist()] for name, answers in responses.items()}
    out = {}
    for name, answers in sets.items():
        keep = [j for j, (answer, i) in enumerate(zip(answers, rows.tolist(), strict=True))
                if answer and references[i]]
        if not keep:
            continue
        labels: list[QueryType] = ["open" if targets[rows[j]] > 0.5 else "closed" for j in keep]
        out[name] = soft_branch_errors([variant_texts[j] for j in keep], [answers[j] or "" for j in keep],
                                       [references[rows[j]] or "" for j in keep], labels,
                                       probabilities[keep], embed)
    return out


def format_strict(report: StrictReport) -> str:
    """The report as Markdown tables."""
    splits = list(SPLITS)
    lines = [f"{report.data}: {report.queries} labelled queries, {report.folds}-fold cross-validation of "
             f"the recipe (l2 {report.recipe.l2:g}, augmented: {'yes' if report.recipe.augment else 'no'})",
             "", "| variant | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for variant in VARIANTS:
        cells = [next(f"{r.accuracy:.1%} ± {r.se:.1%}" for r in report.results
                      if r.split == split and r.variant == variant) for split in splits]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    mean, se = report.strict
    lines += ["", f"**Strict figure** (grouped by leading word; {' and '.join(STRICT_VARIANTS)}): "
              f"**{mean:.1%} ± {se:.1%}**", ""]
    lines += [f"- as written, {name}: {acc:.1%} ± {se:.1%} ({n} queries)"
              for name, (n, acc, se) in report.by_input.items()]
    temperatures = ", ".join(f"{t:.2f}" for t in report.temperatures)
    lines += ["", f"Calibration (temperature per fold, fitted on the other folds: {temperatures}):", "",
              "| p(open) | queries | mean p, uncalibrated → calibrated | labelled open |",
              "|---|---|---|---|"]
    for raw, fitted in zip(report.reliability["uncalibrated"], report.reliability["calibrated"], strict=True):
        if raw.count or fitted.count:
            lines.append(f"| {fitted.low:.1f}–{fitted.high:.1f} | {raw.count} → {fitted.count} | "
                         f"{_pct(raw.mean_probability)} → {_pct(fitted.mean_probability)} | "
                         f"{_pct(raw.open_share)} → {_pct(fitted.open_share)} |")
    lines += ["", "ECE: " + ", ".join(f"{name} {expected_calibration_error(table):.3f}"
                                      for name, table in report.reliability.items())]
    for name, errors in report.soft_branch.items():
        lines += ["", f"Soft branch, reward error against the reward under the GPT-4 label ({name}):", "",
                  "| branch | blended | mean abs error | RMS error | mean error |", "|---|---|---|---|---|"]
        lines += [f"| {e.band} | {e.blended_share:.1%} | {e.mean_abs_error:.4f} | {e.rms_error:.4f} | "
                  f"{e.mean_error:+.4f} |" for e in errors]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1%}"


def write_strict(report: StrictReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "strict.md").write_text(format_strict(report) + "\n", encoding="utf-8")
    (out / "strict.json").write_text(report.to_json() + "\n", encoding="utf-8")
    plot_reliability(report.reliability, out / "reliability.png")
