"""Tests for flows.evaluate: AUROC/CI, Youden, Spearman, the written report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flows.evaluate import (
    AucCI,
    Cutoff,
    _resampled_aucs,
    auc_difference_ci,
    auc_gain_lower_bounds,
    auc_rank,
    evaluate,
    plot_reference_distribution,
    roc_auc_ci,
    spearman,
    youden_cutoff,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _toy(n_neg: int, n_pos: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    scores = np.r_[rng.normal(0, 1, n_neg), rng.normal(shift, 1, n_pos)]
    return labels, scores


# ---------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(5))
def test_rank_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, 200).astype(float)  # heavy ties
    assert auc_rank(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_bootstrap_replicates_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 8, 40).astype(float)
    neg = rng.integers(0, 8, 70).astype(float) - 1.0
    pi = rng.integers(0, pos.size, (25, pos.size))
    ni = rng.integers(0, neg.size, (25, neg.size))
    got = _resampled_aucs(pos, neg, pi, ni)
    for b in range(25):
        y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        want = roc_auc_score(y, np.r_[pos[pi[b]], neg[ni[b]]])
        assert got[b] == pytest.approx(want, abs=1e-12)


def test_ci_contains_estimate_and_narrows_with_n() -> None:
    small = roc_auc_ci(*_toy(40, 40, 1.0), n_boot=500)
    large = roc_auc_ci(*_toy(1000, 1000, 1.0), n_boot=500)
    for ci in (small, large):
        assert isinstance(ci, AucCI)
        assert ci.lo <= ci.auc <= ci.hi
    assert (large.hi - large.lo) < 0.5 * (small.hi - small.lo)
    assert (large.n_pos, large.n_neg) == (1000, 1000)
    # deterministic for a fixed seed
    assert roc_auc_ci(*_toy(40, 40, 1.0), n_boot=500) == small


def test_perfect_separation() -> None:
    ci = roc_auc_ci([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9], n_boot=200)
    assert ci.auc == 1.0 and ci.lo == 1.0 and ci.hi == 1.0


def test_bootstrap_speed() -> None:
    labels, scores = _toy(2000, 1000, 0.8)
    t = time.perf_counter()
    roc_auc_ci(labels, scores, n_boot=1000)
    assert time.perf_counter() - t < 5.0


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "only one class"),
        ([0, 0], [0.1, 0.2], "only one class"),
        ([0, 1, 0, 1], [0.1, np.nan, 0.3, np.inf], r"2 non-finite .* first at index 1"),
        ([0, 1, 0], [0.1, 0.2], "length mismatch"),
        ([], [], "empty"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 .normal. or 1"),
    ],
)
def test_bad_input_raises(labels: list[int], scores: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        roc_auc_ci(labels, scores, n_boot=10)


# ---------------------------------------------------------------- Youden, Spearman


def test_paired_difference_ci_is_narrower_than_the_separate_intervals() -> None:
    """Two scores that share most of their noise: their AUROCs' own intervals overlap widely,
    the paired interval of the difference does not include 0."""
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(100), np.ones(100)].astype(bool)
    common = rng.normal(size=200)
    a = y * 0.8 + common
    b = y * 0.6 + common + 0.1 * rng.normal(size=200)
    d, lo, hi = auc_difference_ci(y, a, b, n_boot=1000)
    assert d == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    ca, cb = roc_auc_ci(y, a), roc_auc_ci(y, b)
    assert ca.lo < cb.hi  # separately: indistinguishable
    assert 0.0 < lo < d < hi and hi - lo < 0.5 * (ca.hi - ca.lo)
    assert auc_difference_ci(y, a, a) == (0.0, 0.0, 0.0)


def test_gain_bounds_find_a_real_gain() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(150), np.ones(150)].astype(bool)
    base = y * 0.5 + rng.normal(size=300)  # AUROC ~0.64
    cands = {"strong": y * 1.5 + rng.normal(size=300),  # ~0.86
             **{f"same{i}": y * 0.5 + rng.normal(size=300) for i in range(8)}}
    b = auc_gain_lower_bounds(y, base, cands, n_boot=500)
    assert set(b) == set(cands)
    gain, lower = b["strong"]
    assert gain == pytest.approx(roc_auc_score(y, cands["strong"]) - roc_auc_score(y, base))
    assert 0.0 < lower < gain
    assert all(lo < g for g, lo in b.values())


def test_gain_bounds_hold_for_the_best_of_many_equal_scores() -> None:
    """Eight candidates as good as the base: the best one's bound stays below 0 in about
    1 - alpha of the trials, though its own observed gain is above 0 in nearly all of them."""
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(60), np.ones(60)].astype(bool)
    false, best_positive = 0, 0
    for _ in range(40):
        base = y * 0.6 + rng.normal(size=120)
        cands = {f"c{i}": y * 0.6 + rng.normal(size=120) for i in range(8)}
        b = auc_gain_lower_bounds(y, base, cands, n_boot=400, seed=int(rng.integers(1 << 30)))
        false += any(lo > 0 for _, lo in b.values())
        best_positive += max(g for g, _ in b.values()) > 0
    assert best_positive >= 30  # the winner's curse the bound guards against
    assert false <= 6  # nominal 5 % of 40 = 2


def test_youden_toy() -> None:
    labels = [0, 0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.65, 0.5, 0.7, 0.9]
    cut = youden_cutoff(labels, scores)
    assert isinstance(cut, Cutoff)
    assert cut.threshold == 0.5
    assert cut.sensitivity == 1.0
    assert cut.specificity == pytest.approx(0.8)
    assert cut.youden_j == pytest.approx(0.8)


def test_spearman() -> None:
    x = np.arange(20.0)
    rho, p = spearman(x, x**3)
    assert rho == pytest.approx(1.0) and p < 1e-6
    with pytest.raises(ValueError, match="non-finite"):
        spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="constant"):
        spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="length mismatch"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])


# ---------------------------------------------------------------- evaluate()


def _dataset(
    n: int = 120, three_d: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2], size=n, p=[0.6, 0.25, 0.15])
    labels[-1] = 3  # a single case of a rare finding: n reported, no AUROC
    zero = rng.uniform(0.1, 0.6, n)
    shape = (n, 1, 6, 16, 16) if three_d else (n, 1, 24, 24)
    images = rng.normal(size=shape).astype(np.float32)
    post = rng.normal(size=n) + 1.2 * (labels > 0)
    like = -3.0 * zero + 0.1 * rng.normal(size=n) + 0.2 * (labels > 0)
    return labels, zero, images, {"neg log posterior": post, "neg log-likelihood": like}


FINDINGS = ["normal", "opacity", "nodule", "rare"]


def test_evaluate_writes_report(tmp_path: Path) -> None:
    labels, zero, images, scores = _dataset()
    out = tmp_path / "report"
    summary = evaluate(out, labels=labels, findings=FINDINGS, scores=scores, images=images,
                       zero_fraction=zero, title="toy CXR", n_boot=100,
                       extra={"model": "cpu-cxr", "epochs": np.int64(3), "lr": np.float32(1e-3)})
    expected = {"roc.png", "roc_findings.png", "summary.json", "summary.md"}
    for slug in ("neg_log_posterior", "neg_log-likelihood"):
        expected |= {f"hist_{slug}.png", f"montage_{slug}_most.png",
                     f"montage_{slug}_least.png", f"zero_fraction_{slug}.png"}
    written = {p.name for p in out.iterdir()}
    assert expected <= written
    for name in expected - {"summary.json", "summary.md"}:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert set(summary["files"]) == expected

    loaded = json.loads((out / "summary.json").read_text())
    assert loaded == summary
    s = loaded["scores"]["neg log posterior"]
    assert s["overall"]["lo"] <= s["overall"]["auc"] <= s["overall"]["hi"]
    assert s["overall"]["auc"] > 0.7
    assert set(s["per_finding"]) == {"opacity", "nodule", "rare"}
    assert s["per_finding"]["opacity"]["auc"] is not None
    rare = s["per_finding"]["rare"]
    assert rare["auc"] is None and rare["n_pos"] == 1
    assert s["youden"]["threshold"] is not None
    # the confound: likelihood tracks background, the posterior does not
    like_rho = loaded["scores"]["neg log-likelihood"]["spearman_zero_fraction"]["normal"]["rho"]
    post_rho = s["spearman_zero_fraction"]["normal"]["rho"]
    assert like_rho < -0.8 and abs(post_rho) < 0.4
    assert loaded["extra"] == {"model": "cpu-cxr", "epochs": 3, "lr": pytest.approx(1e-3)}
    assert loaded["classes"]["rare"] == 1

    pd = loaded["paired_differences"]
    assert pd["against"] == "neg log posterior" and set(pd["differences"]) == {"neg log-likelihood"}
    d = pd["differences"]["neg log-likelihood"]
    assert d["difference"] == pytest.approx(
        s["overall"]["auc"] - loaded["scores"]["neg log-likelihood"]["overall"]["auc"])
    assert d["lo"] <= d["difference"] <= d["hi"]

    md = (out / "summary.md").read_text()
    assert "| score | overall | opacity | nodule | rare |" in md
    assert "n/a (1 abnormal, 61 normal)" in md and "Youden" in md and "Spearman" in md
    assert "## AUROC of neg log posterior minus each other score" in md


def test_evaluate_3d_without_zero_fraction(tmp_path: Path) -> None:
    labels, _, images, scores = _dataset(n=40, three_d=True, seed=3)
    summary = evaluate(tmp_path, labels=labels, findings=FINDINGS, scores=scores,
                       images=images, n_boot=50)
    assert (tmp_path / "montage_neg_log_posterior_most.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("zero_fraction_*.png"))
    assert "spearman_zero_fraction" not in summary["scores"]["neg log posterior"]


def test_evaluate_string_labels_no_images(tmp_path: Path) -> None:
    labels = np.array(["normal"] * 10 + ["bleed"] * 6)
    scores = {"s": np.r_[np.linspace(0, 1, 10), np.linspace(0.8, 2, 6)]}
    summary = evaluate(tmp_path, labels=labels, findings=["normal", "bleed"], scores=scores,
                       n_boot=20)
    assert summary["scores"]["s"]["per_finding"]["bleed"]["n_pos"] == 6
    assert not list(tmp_path.glob("montage_*"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": np.zeros(10, int)}, "only one class"),
        ({"scores": {"s": np.r_[np.full(9, 0.5), np.nan]}}, r"score 's' .*index 9"),
        ({"scores": {"s": np.zeros(7)}}, "length mismatch"),
        ({"labels": np.r_[np.zeros(5, int), np.full(5, 9)]}, "out of range"),
        ({"images": np.zeros((9, 1, 4, 4))}, "length mismatch"),
        ({"zero_fraction": np.zeros(3)}, "zero_fraction"),
    ],
)
def test_evaluate_bad_input(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "labels": np.r_[np.zeros(5, int), np.ones(5, int)],
        "findings": ["normal", "x"],
        "scores": {"s": np.arange(10.0)},
        "n_boot": 10,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate(tmp_path, **args)  # type: ignore[arg-type]


def test_plot_reference_distribution(tmp_path: Path) -> None:
    ref = np.random.default_rng(0).normal(size=500)
    p = plot_reference_distribution(tmp_path / "sub" / "ref.png", ref, marker=1.5, title="ref")
    assert p.read_bytes()[:8] == PNG_MAGIC


def test_radiograph_localisation_scores_where_the_map_points() -> None:
    from flows.mapeval import localisation_markdown, radiograph_localisation

    masks = np.zeros((4, 16, 16), bool)
    masks[0, 2:5, 2:5] = True   # nodule: the map's maximum is inside
    masks[1, 10:13, 10:13] = True  # nodule: the maximum is far away, only the overlay touches it
    maps = np.zeros((4, 16, 16))
    maps[0, 3, 3] = 9.0
    maps[1, 0, 15] = 9.0
    maps[1, 11, 11] = 4.0
    maps[2, 8, 8] = 5.0  # a normal with an overlay pixel; case 3: a normal without
    loc = radiograph_localisation(maps, masks, ["nodule", "nodule", "normal", "normal"], threshold=3.0,
                                  top_fraction=1 / 256)
    e = loc["findings"]["nodule"]
    assert e["n"] == 2 and e["pointing"] == 0.5 and e["top_hit"] == 0.5 and e["overlay_hit"] == 1.0
    assert e["chance"] == pytest.approx(21 / 256)  # 3x3 grown by one pixel (4-connected): 21
    assert e["overlay_area"] == pytest.approx((1 / 256 + 2 / 256) / 2)
    assert loc["normal_overlay_rate"] == 0.5
    assert "| nodule | 2 | 0.50 |" in localisation_markdown(loc)
    no_overlay = radiograph_localisation(maps, masks, ["nodule", "nodule", "normal", "normal"])
    assert "overlay_hit" not in no_overlay["findings"]["nodule"] and "normal_overlay_rate" not in no_overlay
    with pytest.raises(ValueError, match="maps and masks"):
        radiograph_localisation(maps, masks[:, :8], ["normal"] * 4)
