"""triage.route: the default rules, the ignore cases, custom rules and rules from configuration.

Every case checks ``Decision.reason`` too: the status page shows it to the admin, who must
be able to tell from it which rule decided or which condition failed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from triage.config import ConfigError, RouteRule, default_rules, load_settings
from triage.route import Decision, SeriesFacts, route

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"

AXIAL_N = (0.0, 0.0, 1.0)
CORONAL_N = (0.0, 1.0, 0.0)

CXR_RULE = "chest radiograph, frontal"
BCT_RULE = "head CT, axial, 2.5-7 mm"
CHESTCT_RULE = "chest CT, axial, <= 3 mm"


def radiograph(modality: str = "CR", view: str | None = "PA", sop: str | None = None,
               **attrs: Any) -> SeriesFacts:
    a: dict[str, Any] = {"Modality": modality, "BodyPartExamined": "CHEST",
                         "ImageType": ["ORIGINAL", "PRIMARY"], **attrs}
    if view is not None:
        a["ViewPosition"] = view
    return SeriesFacts(sop_class_uid=sop or (CR if modality == "CR" else DX), is_image=True,
                       attributes=a, count=1)


def ct(count: int, spacing: float | None, normal: tuple[float, float, float] | None = AXIAL_N,
       sop: str = CT, **attrs: Any) -> SeriesFacts:
    a: dict[str, Any] = {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], **attrs}
    return SeriesFacts(sop_class_uid=sop, is_image=True, attributes=a, count=count,
                       slice_spacing_mm=spacing, normal=normal)


def decide(facts: SeriesFacts) -> Decision:
    return route(facts, default_rules())


def assert_routed(d: Decision, kind: str, rule: str) -> None:
    assert (d.kind, d.rule) == (kind, rule), d
    assert d.reason == f"rule '{rule}'"


def assert_no_rule(d: Decision, *misses: str) -> None:
    """Ignored because nothing matched, and the reason lists each ``'<rule>: <why>'`` in ``misses``."""
    assert d.kind == "ignore", d
    assert d.rule is None
    assert d.reason.startswith("no rule matched (") and d.reason.endswith(")"), d.reason
    for miss in misses:
        assert miss in d.reason, (miss, d.reason)
    # the ignore rule that did not match (localizer) is no "miss" worth showing
    assert "localizer" not in d.reason


# ----------------------------------------------------------------------------------------- CXR


@pytest.mark.parametrize("modality", ["CR", "DX"])
@pytest.mark.parametrize("view", ["PA", "AP", " pa "])
def test_frontal_chest_radiograph_is_cxr(modality: str, view: str) -> None:
    assert_routed(decide(radiograph(modality, view)), "cxr", CXR_RULE)


def test_cxr_body_part_from_the_description_only() -> None:
    f = radiograph("DX", "PA", BodyPartExamined="", StudyDescription="XR THORAX 2 VIEWS")
    assert_routed(decide(f), "cxr", CXR_RULE)


def test_lateral_chest_radiograph_is_ignored_naming_the_view() -> None:
    d = decide(radiograph("DX", "LL"))
    assert_no_rule(d, f"{CXR_RULE}: view position LL", f"{BCT_RULE}: modality DX",
                   f"{CHESTCT_RULE}: modality DX")


def test_chest_radiograph_without_view_position_is_ignored() -> None:
    assert_no_rule(decide(radiograph("CR", None)), f"{CXR_RULE}: view position missing")


def test_dx_for_processing_is_ignored() -> None:
    d = decide(radiograph("DX", "PA", sop=DX_PROCESSING))
    assert_no_rule(d, f"{CXR_RULE}: SOP class")


def test_radiograph_of_another_body_part_is_ignored() -> None:
    d = decide(radiograph("CR", "PA", BodyPartExamined="HAND"))
    assert_no_rule(d, f"{CXR_RULE}: body part")


# ----------------------------------------------------------------------------------------- BCT


def test_head_ct_axial_5mm_is_bct() -> None:
    assert_routed(decide(ct(30, 5.0, BodyPartExamined="HEAD")), "bct", BCT_RULE)


def test_head_ct_named_only_in_the_study_description_is_bct() -> None:
    assert_routed(decide(ct(30, 5.0, StudyDescription="CT HEAD W/O CONTRAST")), "bct", BCT_RULE)


@pytest.mark.parametrize("spacing", [2.5, 7.0, 2.4995, 7.0005])  # the limits, within 1 um
def test_head_ct_spacing_limits_are_inclusive(spacing: float) -> None:
    assert decide(ct(30, spacing, BodyPartExamined="BRAIN")).kind == "bct"


def test_head_ct_thin_slices_are_not_bct() -> None:
    d = decide(ct(250, 0.625, BodyPartExamined="HEAD"))
    assert_no_rule(d, f"{BCT_RULE}: slice spacing 0.62 mm < 2.5 mm", f"{CHESTCT_RULE}: body part")
    assert "slice spacing" in d.reason


def test_head_ct_thick_slices_are_not_bct() -> None:
    d = decide(ct(12, 10.0, BodyPartExamined="HEAD"))
    assert_no_rule(d, f"{BCT_RULE}: slice spacing 10.00 mm > 7.0 mm")


def test_head_ct_unknown_spacing_is_not_bct() -> None:
    d = decide(ct(30, None, BodyPartExamined="HEAD"))
    assert_no_rule(d, f"{BCT_RULE}: slice spacing unknown < 2.5 mm")


def test_head_ct_coronal_is_not_axial() -> None:
    d = decide(ct(30, 5.0, CORONAL_N, BodyPartExamined="HEAD"))
    assert_no_rule(d, f"{BCT_RULE}: not axial")


def test_head_ct_tilt_within_ten_degrees_is_still_axial() -> None:
    tilt = math.radians(8)
    n = (0.0, -math.sin(tilt), math.cos(tilt))
    assert decide(ct(30, 5.0, n, BodyPartExamined="HEAD")).kind == "bct"
    tilt = math.radians(15)
    n = (0.0, -math.sin(tilt), math.cos(tilt))
    assert_no_rule(decide(ct(30, 5.0, n, BodyPartExamined="HEAD")), f"{BCT_RULE}: not axial")


def test_head_ct_without_slice_geometry_is_ignored() -> None:
    d = decide(ct(30, None, None, BodyPartExamined="HEAD"))
    assert_no_rule(d, f"{BCT_RULE}: no slice geometry")


def test_head_ct_with_too_few_slices_is_ignored() -> None:
    d = decide(ct(9, 5.0, BodyPartExamined="HEAD"))
    assert_no_rule(d, f"{BCT_RULE}: 9 slices < 10")


# ------------------------------------------------------------------------------------- chest CT


def test_chest_ct_axial_thin_is_chestct() -> None:
    assert_routed(decide(ct(200, 1.25, BodyPartExamined="CHEST")), "chestct", CHESTCT_RULE)


def test_chest_ct_from_the_series_description() -> None:
    f = ct(200, 1.25, SeriesDescription="Lung 1.25mm", StudyDescription="CT")
    assert_routed(decide(f), "chestct", CHESTCT_RULE)


def test_chest_ct_5mm_is_ignored() -> None:
    d = decide(ct(60, 5.0, BodyPartExamined="CHEST"))
    assert_no_rule(d, f"{CHESTCT_RULE}: slice spacing 5.00 mm > 3.0 mm", f"{BCT_RULE}: body part")


def test_chest_ct_with_too_few_slices_is_ignored() -> None:
    d = decide(ct(19, 1.25, BodyPartExamined="CHEST"))
    assert_no_rule(d, f"{CHESTCT_RULE}: 19 slices < 20")


# ---------------------------------------------------------------------------------- ignore cases


@pytest.mark.parametrize("image_type", [["ORIGINAL", "PRIMARY", "LOCALIZER"],
                                        ["ORIGINAL", "PRIMARY", "scout"], "TOPOGRAM"])
def test_localizer_is_ignored_even_for_chest_ct(image_type: Any) -> None:
    f = ct(200, 1.25, BodyPartExamined="CHEST", ImageType=image_type)
    d = decide(f)
    assert d == Decision("ignore", "rule 'localizer'", "localizer")


@pytest.mark.parametrize("sop", [BASIC_TEXT_SR, DOSE_SR])
def test_non_image_is_ignored_before_any_rule(sop: str) -> None:
    f = SeriesFacts(sop_class_uid=sop, is_image=False, attributes={"Modality": "SR",
                                                                     "StudyDescription": "CT CHEST"},
                    count=1)
    d = decide(f)
    assert d == Decision("ignore", "not an image SOP class (stored, not analysed)")
    # even a rule that would match anything does not see it
    assert route(f, [RouteRule(name="all", kind="cxr")]).kind == "ignore"


def test_secondary_capture_image_is_ignored() -> None:
    d = decide(radiograph("CR", "PA", sop=SC))
    assert_no_rule(d, f"{CXR_RULE}: SOP class")
    d = decide(ct(200, 1.25, sop=SC, BodyPartExamined="CHEST"))
    assert_no_rule(d, f"{CHESTCT_RULE}: SOP class", f"{BCT_RULE}: SOP class")
    d = decide(SeriesFacts(sop_class_uid=SC, is_image=True, attributes={"Modality": "OT"}, count=1))
    assert_no_rule(d, f"{CXR_RULE}: modality OT", f"{CHESTCT_RULE}: modality OT")


def test_own_output_is_ignored_before_anything() -> None:
    f = SeriesFacts(sop_class_uid=CT, is_image=True, count=200, slice_spacing_mm=1.25, normal=AXIAL_N,
                    attributes={"Modality": "CT", "BodyPartExamined": "CHEST"}, produced_here=True)
    assert decide(f) == Decision("ignore", "this node's own output")
    assert route(f, [RouteRule(name="all", kind="chestct")]).kind == "ignore"


def test_mr_brain_is_ignored() -> None:
    f = SeriesFacts(sop_class_uid="1.2.840.10008.5.1.4.1.1.4", is_image=True, count=30,
                    slice_spacing_mm=5.0, normal=AXIAL_N,
                    attributes={"Modality": "MR", "BodyPartExamined": "BRAIN"})
    assert_no_rule(decide(f), f"{CXR_RULE}: modality MR", f"{BCT_RULE}: modality MR",
                   f"{CHESTCT_RULE}: modality MR")


def test_missing_modality_is_named() -> None:
    f = SeriesFacts(sop_class_uid=CT, is_image=True, attributes={}, count=30, slice_spacing_mm=5.0,
                    normal=AXIAL_N)
    assert_no_rule(decide(f), f"{BCT_RULE}: modality missing")


def test_no_rules_at_all() -> None:
    assert route(ct(30, 5.0, BodyPartExamined="HEAD"), []) == Decision("ignore", "no rule matched")


# ---------------------------------------------------------------------------------- custom rules


def test_a_rule_before_the_defaults_wins() -> None:
    nowhere = RouteRule(name="abdomen CT: not analysed", kind="ignore", modalities=["CT"],
                        body_parts=["ABDOMEN"])
    rules = [nowhere, *default_rules()]
    f = ct(200, 1.25, StudyDescription="CT CHEST ABDOMEN PELVIS")
    assert decide(f).kind == "chestct"  # the defaults alone analyse it
    name = "abdomen CT: not analysed"
    assert route(f, rules) == Decision("ignore", f"rule '{name}'", name)
    # a plain chest CT is untouched by the extra rule
    assert_routed(route(ct(200, 1.25, BodyPartExamined="CHEST"), rules), "chestct", CHESTCT_RULE)


def test_first_match_wins_among_routing_rules() -> None:
    thin_head = RouteRule(name="thin head CT", kind="bct", modalities=["CT"], body_parts=["HEAD"],
                          axial=True, max_slice_mm=1.0)
    f = ct(250, 0.625, BodyPartExamined="HEAD")
    assert decide(f).kind == "ignore"
    assert_routed(route(f, [*default_rules(), thin_head]), "bct", "thin head CT")
    # placed after a rule that also matches, it loses
    anything_ct = RouteRule(name="any CT", kind="chestct", modalities=["CT"])
    assert_routed(route(f, [anything_ct, thin_head]), "chestct", "any CT")


def test_exclude_words() -> None:
    rule = RouteRule(name="chest CT, not angio", kind="chestct", modalities=["CT"], body_parts=["CHEST"],
                     exclude_words=["ANGIO", "CTA"])
    assert route(ct(200, 1.0, StudyDescription="CT CHEST"), [rule]).kind == "chestct"
    d = route(ct(200, 1.0, StudyDescription="CT CHEST", SeriesDescription="pulmonary angio"), [rule])
    assert d == Decision("ignore", "no rule matched (chest CT, not angio: excluded description)")


def test_an_ignore_rule_that_does_not_match_is_not_listed() -> None:
    rules = [RouteRule(name="drop MR", kind="ignore", modalities=["MR"]),
             RouteRule(name="only CR", kind="cxr", modalities=["CR"])]
    d = route(ct(30, 5.0), rules)
    assert d == Decision("ignore", "no rule matched (only CR: modality CT)")


# -------------------------------------------------------------------------------- configuration

CUSTOM: list[dict[str, Any]] = [{"name": "abdomen CT: not analysed", "kind": "ignore", "modalities": ["CT"],
           "body_parts": ["ABDOMEN"]},
          {"name": "chest CT up to 5 mm", "kind": "chestct", "modalities": ["CT"], "body_parts": ["CHEST"],
           "axial": True, "max_slice_mm": 5.0, "min_slices": 20}]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for k in list(os.environ):
        if k.startswith("TRIAGE_"):
            monkeypatch.delenv(k)
    return monkeypatch


def _check_custom(rules: list[RouteRule]) -> None:
    assert [r.name for r in rules] == [c["name"] for c in CUSTOM]
    assert rules[1].max_slice_mm == 5.0 and rules[1].axial is True
    assert route(ct(60, 5.0, BodyPartExamined="CHEST"), rules) == Decision(
        "chestct", "rule 'chest CT up to 5 mm'", "chest CT up to 5 mm")
    assert route(ct(60, 5.0, StudyDescription="CT ABDOMEN"), rules).kind == "ignore"


def test_default_settings_carry_the_default_rules(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().route.rules == default_rules()


def test_rules_given_in_code(clean_env: pytest.MonkeyPatch) -> None:
    _check_custom(load_settings(route={"rules": CUSTOM}).route.rules)


def test_rules_given_as_json_in_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TRIAGE_ROUTE__RULES", json.dumps(CUSTOM))
    _check_custom(load_settings().route.rules)


def test_rules_given_in_toml(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "triage.toml"
    path.write_text(
        '[[route.rules]]\nname = "abdomen CT: not analysed"\nkind = "ignore"\nmodalities = ["CT"]\n'
        'body_parts = ["ABDOMEN"]\n\n'
        '[[route.rules]]\nname = "chest CT up to 5 mm"\nkind = "chestct"\nmodalities = ["CT"]\n'
        'body_parts = ["CHEST"]\naxial = true\nmax_slice_mm = 5.0\nmin_slices = 20\n')
    _check_custom(load_settings(path).route.rules)


def test_unknown_kind_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"route\.rules") as info:
        load_settings(route={"rules": [{"name": "mri", "kind": "mri"}]})
    assert "kind" in str(info.value)
    clean_env.setenv("TRIAGE_ROUTE__RULES", json.dumps([{"name": "mri", "kind": "brainmr"}]))
    with pytest.raises(ConfigError, match=r"route\.rules"):
        load_settings()


def test_unknown_rule_condition_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"route\.rules\.0\.bodypart"):
        load_settings(route={"rules": [{"name": "typo", "kind": "cxr", "bodypart": ["CHEST"]}]})
