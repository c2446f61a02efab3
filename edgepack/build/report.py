"""The build report: per variant the recipe, size, latency, quality, exclusions and provenance.

One structure, two renderings: a plain dict (``--json`` and the report file
beside the bundles) and a rich table for a person at a terminal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VariantReport:
    """What was built for one hardware profile."""

    profile: str
    architecture: str
    recipe: str
    recipe_label: str
    parameters: dict[str, Any]
    excluded_nodes: list[str]
    reason: str
    target: str
    quality: dict[str, Any]
    size_bytes: int
    fp32_size_bytes: int
    latency_ms: float
    fp32_latency_ms: float
    memory_mb: float
    health: dict[str, Any]
    tried: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    bundle: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        """Size of this variant over the fp32 model's."""
        return self.size_bytes / self.fp32_size_bytes if self.fp32_size_bytes else 1.0

    @property
    def speedup(self) -> float:
        """fp32 latency over this variant's (single thread, median)."""
        return self.fp32_latency_ms / self.latency_ms if self.latency_ms else 1.0


@dataclass
class BuildReport:
    """The whole build: source, conversion, and one entry per variant."""

    name: str
    version: str
    source: str
    converter: str
    provenance: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    validation: dict[str, Any]
    conversion_quality: dict[str, Any] | None
    variants: list[VariantReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-finite numbers become null)."""
        data = asdict(self)
        for variant, entry in zip(self.variants, data["variants"], strict=False):
            entry["size_ratio"] = round(variant.size_ratio, 4)
            entry["speedup"] = round(variant.speedup, 3)
        cleaned: dict[str, Any] = clean(data)
        return cleaned


def clean(value: Any) -> Any:
    """Replace NaN and infinities by None, recursively (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(report: BuildReport, console: Any) -> None:
    """Print the report as tables on a rich console (free text is escaped, never markup)."""
    from rich.markup import escape
    from rich.table import Table

    console.print(
        f"[bold]{escape(report.name)} {escape(report.version)}[/bold] from "
        f"{escape(report.source)} ({escape(report.converter)}, "
        f"{report.provenance.get('source_digest', '')[:19]}…)"
    )
    console.print(
        f"validation: {report.validation.get('origin')} "
        f"({report.validation.get('samples')} samples)",
        markup=False,
    )
    # Two narrow tables rather than one wide one, so that an 80-column terminal shows
    # whole profile names; the bundle file goes on each variant's own line.
    speed = Table(title="size and speed", show_header=True, header_style="bold")
    speed.add_column("profile", no_wrap=True)
    speed.add_column("recipe", overflow="fold")
    for column in ("size", "×fp32", "latency ms", "speed-up"):
        speed.add_column(column, justify="right", no_wrap=True)
    quality = Table(title="quality against fp32", show_header=True, header_style="bold")
    quality.add_column("profile", no_wrap=True)
    for column in ("mean cos", "min cos", "max |Δ|", "top-1", "acc drop"):
        quality.add_column(column, justify="right", no_wrap=True)
    for v in report.variants:
        q = v.quality
        speed.add_row(
            escape(v.profile),
            escape(v.recipe_label),
            _size(v.size_bytes),
            f"{v.size_ratio:.2f}",
            f"{v.latency_ms:.3f}",
            f"{v.speedup:.2f}x",
        )
        quality.add_row(
            escape(v.profile),
            _fmt(q.get("mean_cosine")),
            _fmt(q.get("min_cosine")),
            _fmt(q.get("max_abs_diff"), 5),
            _fmt(q.get("top1_agreement")),
            _fmt(q.get("accuracy_drop")),
        )
    console.print(speed)
    console.print(quality)
    for v in report.variants:
        bundle = f" → {escape(v.bundle.rsplit('/', 1)[-1])}" if v.bundle else ""
        console.print(f"[bold]{escape(v.profile)}[/bold]{bundle}: {escape(v.reason)}")
        if v.excluded_nodes:
            console.print(f"  kept in fp32: {', '.join(v.excluded_nodes)}", markup=False)
        for note in v.notes:
            console.print(f"  note: {note}", markup=False)
    tools = ", ".join(f"{k} {val}" for k, val in sorted(report.provenance.get("tools", {}).items()))
    console.print(f"provenance: {report.provenance.get('source_digest')} ({tools})", markup=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
