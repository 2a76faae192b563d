"""Which model a complete series goes to: ``cxr``, ``bct``, ``chestct`` or ``ignore``.

Rules (:class:`triage.config.RouteRule`) are tried in order and the first whose every
given condition holds decides; nothing matching means ``ignore``. Non-image SOP classes
(SR, SEG, KO, PR, dose reports, encapsulated documents) and this node's own outputs are
ignored before any rule. Every decision carries a reason that names the rule or the
failed condition, for the status page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from triage.config import RouteRule

__all__ = ["Decision", "SeriesFacts", "route"]

AXIAL_COS = 0.985  # |slice normal . z| above this (about 10 degrees) counts as axial


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at: header attributes of the series plus its measured geometry."""

    sop_class_uid: str
    is_image: bool
    attributes: dict[str, Any]
    count: int
    slice_spacing_mm: float | None = None  # from the positions along the normal
    normal: tuple[float, float, float] | None = None
    produced_here: bool = False  # this node's own SR/SEG/SC output came back


@dataclass(frozen=True)
class Decision:
    kind: str
    reason: str
    rule: str | None = None


def _words(attrs: dict[str, Any]) -> str:
    parts = [attrs.get(k) for k in ("BodyPartExamined", "StudyDescription", "SeriesDescription",
                                    "ProtocolName")]
    return " ".join(str(p) for p in parts if p).upper()


def _image_type(attrs: dict[str, Any]) -> set[str]:
    v = attrs.get("ImageType")
    vals = v if isinstance(v, list) else ([v] if v else [])
    return {str(x).upper().strip() for x in vals}


def _why_not(rule: RouteRule, f: SeriesFacts) -> str | None:
    """None when ``rule`` matches ``f``; otherwise the first condition that fails."""
    a = f.attributes
    modality = str(a.get("Modality", "")).upper()
    if rule.modalities and modality not in {m.upper() for m in rule.modalities}:
        return f"modality {modality or 'missing'}"
    if rule.sop_classes and f.sop_class_uid not in rule.sop_classes:
        return "SOP class"
    words = _words(a)
    if rule.body_parts and not any(b.upper() in words for b in rule.body_parts):
        return "body part"
    if rule.exclude_words and any(w.upper() in words for w in rule.exclude_words):
        return "excluded description"
    if rule.image_types and not _image_type(a) & {t.upper() for t in rule.image_types}:
        return "image type"
    if rule.view_positions:
        view = str(a.get("ViewPosition", "")).upper().strip()
        if view not in {v.upper() for v in rule.view_positions}:
            return f"view position {view or 'missing'}"
    if rule.axial is not None:
        if f.normal is None:
            return "no slice geometry"
        axial = abs(f.normal[2]) >= AXIAL_COS
        if axial != rule.axial:
            return "not axial" if rule.axial else "axial"
    if rule.min_slices is not None and f.count < rule.min_slices:
        return f"{f.count} slices < {rule.min_slices}"
    sp = f.slice_spacing_mm
    if rule.min_slice_mm is not None and (sp is None or sp < rule.min_slice_mm - 1e-3):
        return f"slice spacing {_mm(sp)} < {rule.min_slice_mm} mm"
    if rule.max_slice_mm is not None and (sp is None or sp > rule.max_slice_mm + 1e-3):
        return f"slice spacing {_mm(sp)} > {rule.max_slice_mm} mm"
    return None


def _mm(sp: float | None) -> str:
    return "unknown" if sp is None else f"{sp:.2f} mm"


def route(facts: SeriesFacts, rules: Sequence[RouteRule]) -> Decision:
    """The first matching rule's kind, with the reason; ``ignore`` when none matches."""
    if facts.produced_here:
        return Decision("ignore", "this node's own output")
    if not facts.is_image:
        return Decision("ignore", "not an image SOP class (stored, not analysed)")
    misses = []
    for rule in rules:
        why = _why_not(rule, facts)
        if why is None:
            return Decision(rule.kind, f"rule '{rule.name}'", rule.name)
        if rule.kind != "ignore":
            misses.append(f"{rule.name}: {why}")
    return Decision("ignore", "no rule matched (" + "; ".join(misses) + ")" if misses else "no rule matched")
