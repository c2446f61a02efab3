"""Choosing a recipe: an explicit one checked against the target, or the ``auto`` search.

``auto`` tries the int8 recipes and keeps the fastest that meets the target.
When none does, it excludes the nodes most sensitive to quantisation (each
measured by quantising it alone) until the target holds, never giving up more
than half of the quantisable weights, and explains what it chose and why.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgepack.build import validate
from edgepack.build.quantize import Evaluator, QualityTargetError, Quantizer, Recipe, Trial
from edgepack.errors import InvalidInputError

SAME_SPEED = 1.15  # latencies within 15% count as equal when choosing between recipes
MAX_EXCLUDED_WEIGHT_SHARE = 0.5
MAX_SENSITIVITY_NODES = 96


@dataclass
class Choice:
    """The trial a recipe settled on and why."""

    trial: Trial
    reason: str
    sensitivity: list[tuple[str, float]] = field(default_factory=list)


def choose(
    kind: str,
    base: Recipe,
    quantizer: Quantizer,
    evaluator: Evaluator,
    progress: Callable[[str], None] = lambda _: None,
) -> Choice:
    """Quantise with an explicit recipe or search with ``auto``; enforce the target."""
    if kind != "auto":
        recipe = replace(base, kind=kind)
        progress(recipe.label())
        trial = evaluator.evaluate(recipe, quantizer.apply(recipe))
        if not trial.passes:
            _fail(f"the {recipe.label()} variant misses the quality target", evaluator)
        return Choice(
            trial,
            f"{recipe.label()} was requested; it meets the target ({evaluator.target.describe()})",
        )
    return _auto(base, quantizer, evaluator, progress)


def _auto(
    base: Recipe, quantizer: Quantizer, evaluator: Evaluator, progress: Callable[[str], None]
) -> Choice:
    weights = quantizer.weighted_nodes()
    if not weights:
        recipe = replace(base, kind="none")
        trial = evaluator.evaluate(recipe, quantizer.apply(recipe))
        return Choice(trial, "the model has no MatMul/Gemm/Conv weights to quantise; kept fp32")
    candidates = [replace(base, kind="dynamic", per_channel=True)]
    skipped = ""
    if quantizer.calibration is not None:
        candidates.append(replace(base, kind="static", per_channel=True))
    else:
        skipped = "; static QDQ not tried (no calibration data)"
    trials = []
    failures: list[InvalidInputError] = []
    for recipe in candidates:
        progress(recipe.label())
        try:
            trials.append(evaluator.evaluate(recipe, quantizer.apply(recipe)))
        except InvalidInputError as exc:  # e.g. a quantised operator the runtime lacks
            failures.append(exc)
            skipped += f"; {recipe.label()} failed: {exc.message}"
    if not trials:
        raise failures[0]
    best = max(trials, key=Trial.score)
    # Timings stay out of the reason: it goes into the bundle's metadata, which must not
    # change from one build of the same model to the next. The report lists them.
    tried = ", ".join(f"{t.recipe.label()}: cosine {t.parity.mean_cosine:.4f}" for t in trials)
    passing = [t for t in trials if t.passes]
    if passing:
        # Among recipes that meet the target the fastest wins; near-ties go to the smaller.
        fastest = min(t.latency_ms for t in passing)
        quick = [t for t in passing if t.latency_ms <= fastest * SAME_SPEED]
        chosen = min(quick, key=lambda t: (t.size, -t.parity.mean_cosine))
        verb = "is the fastest that meets" if len(passing) > 1 else "meets"
        return Choice(
            chosen,
            f"{chosen.recipe.label()} {verb} the target ({evaluator.target.describe()}) with "
            f"nothing kept in fp32 (tried {tried}{skipped})",
        )
    progress("measuring per-node sensitivity")
    ranking = _sensitivity(best.recipe, list(weights)[:MAX_SENSITIVITY_NODES], quantizer, evaluator)
    order = [name for name, _ in ranking]
    total = sum(weights.values())
    cap, kept = 0, 0
    for name in order:
        if kept + weights[name] > MAX_EXCLUDED_WEIGHT_SHARE * total:
            break
        kept += weights[name]
        cap += 1

    def attempt(count: int) -> Trial:
        recipe = replace(best.recipe, exclude=tuple(order[:count]))
        progress(recipe.label())
        return evaluator.evaluate(recipe, quantizer.apply(recipe))

    found: Trial | None = None
    if cap:
        widest = attempt(cap)
        if widest.passes:
            found, low, high = widest, 1, cap - 1
            while low <= high:  # the fewest exclusions that still meet the target
                middle = (low + high) // 2
                trial = attempt(middle)
                if trial.passes:
                    found, high = trial, middle - 1
                else:
                    low = middle + 1
    if found is None:
        _fail(
            f"auto found no int8 recipe meeting the target even with {cap} of the most sensitive "
            f"nodes in fp32 (at most {int(MAX_EXCLUDED_WEIGHT_SHARE * 100)}% of the weights)",
            evaluator,
        )
    assert found is not None
    excluded = ", ".join(found.recipe.exclude)
    reason = (
        f"{best.recipe.label()} was the best plain int8 recipe but missed the target "
        f"({'; '.join(best.unmet)}); keeping the {len(found.recipe.exclude)} most sensitive "
        f"nodes in fp32 ({excluded}) meets it ({evaluator.target.describe()}){skipped}"
    )
    return Choice(found, reason, ranking)


def _sensitivity(
    recipe: Recipe, nodes: list[str], quantizer: Quantizer, evaluator: Evaluator
) -> list[tuple[str, float]]:
    """Each node's loss (1 − mean cosine) when it alone is quantised, most sensitive first."""
    losses: list[tuple[str, float]] = []
    for name in nodes:
        path = quantizer.apply(recipe, only=[name])
        session = evaluator.session(path)
        outputs = validate.run(session, evaluator.validation.batches)
        parity = validate.parity(evaluator.reference, outputs, None, evaluator.classifier)
        losses.append((name, 1.0 - parity.mean_cosine + (parity.accuracy_drop or 0.0)))
        shutil.rmtree(path.parent, ignore_errors=True)
    return sorted(losses, key=lambda item: -item[1])


def _fail(message: str, evaluator: Evaluator) -> None:
    best = max(evaluator.trials, key=Trial.score) if evaluator.trials else None
    if best is not None:
        figures = best.parity
        drop = figures.accuracy_drop
        message += (
            f" ({evaluator.target.describe()}); best reached: {best.recipe.label()} with mean "
            f"cosine {figures.mean_cosine:.4f}, min cosine {figures.min_cosine:.4f}"
            + (f", accuracy drop {drop:.4f}" if drop is not None else "")
            + (f", metric {best.metric:.4g}" if best.metric is not None else "")
            + f" ({'; '.join(best.unmet)})"
        )
    raise QualityTargetError(message, best=best, tried=list(evaluator.trials))
