"""Test-time translation averaging (flows.glow.Translated) and its place in a bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.bundle import Bundle, BundleError, load_bundle, save_bundle
from flows.glow import Glow, GlowConfig, Translated, translate, translations, untranslate_map
from flows.posterior import PosteriorScorer
from flows.quantize import dequantize
from tests.conftest import blobs


def _model(cfg: GlowConfig, shape: tuple[int, ...], seed: int = 0) -> Glow:
    torch.manual_seed(seed)
    g = Glow(cfg, seed=seed).double()
    g.initialize(torch.rand(8, 1, *shape, dtype=torch.float64) - 0.5)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


def _refuses_manifest_values(bundle: Path, tmp_path: Path, key: str, bads: tuple[object, ...]) -> None:
    for bad in bads:
        copy = tmp_path / f"copy-{key}-{bad}"
        shutil.copytree(bundle, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, key: bad}))
        with pytest.raises(BundleError, match=key):
            load_bundle(copy)


def test_translations_cover_the_square_and_start_at_zero() -> None:
    offs = translations(1, 2)
    assert offs[0] == (0, 0) and len(offs) == len(set(offs)) == 9
    assert {max(map(abs, o)) for o in offs} == {0, 1}
    assert len(translations(2, 3)) == 125
    assert translations(0, 2) == [(0, 0)]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="radius"):
            translations(bad, 2)  # type: ignore[arg-type]


def test_translate_moves_content_and_repeats_the_edge() -> None:
    x = torch.arange(20.0).reshape(1, 1, 4, 5)
    y = translate(x, (1, -2))
    # out[i, j] = x[i + 1, j - 2], clamped into the image
    for i in range(4):
        for j in range(5):
            assert y[0, 0, i, j] == x[0, 0, min(i + 1, 3), max(j - 2, 0)]
    assert translate(x, (0, 0)) is x
    with pytest.raises(ValueError, match="offset"):
        translate(x, (1,))


@pytest.mark.parametrize("offset", [(1, 0), (-2, 1), (0, 3)])
def test_untranslate_is_the_adjoint_and_keeps_the_sum(offset: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 6, 7, generator=gen, dtype=torch.float64)
    m = torch.rand(2, 6, 7, generator=gen, dtype=torch.float64)
    lhs = (translate(x, offset)[:, 0] * m).sum()
    rhs = (x[:, 0] * untranslate_map(m, offset)).sum()
    assert torch.allclose(lhs, rhs)
    assert torch.allclose(untranslate_map(m, offset).sum((1, 2)), m.sum((1, 2)))


@pytest.mark.parametrize("cfg,shape", [
    (GlowConfig(1, 2, levels=2, steps=2, hidden=8, scale_fn="paper"), (8, 8)),
    (GlowConfig(1, 3, levels=2, steps=1, hidden=4, scale_fn="glow"), (4, 8, 8)),
])
def test_translated_model_is_the_mean_over_shifts(cfg: GlowConfig, shape: tuple[int, ...]) -> None:
    g = _model(cfg, shape)
    t = Translated(g, 1).eval()
    x = torch.rand(3, 1, *shape, dtype=torch.float64) - 0.5
    with torch.no_grad():
        want = torch.stack([g(translate(x, o)).log_p for o in translations(1, len(shape))]).mean(0)
        lp = t(x).log_p
        m = t.log_p_map(x)
    assert torch.allclose(lp, want)
    assert not torch.allclose(lp, g(x).log_p)  # the shifts do change the score
    assert m.shape == (3, *shape)
    assert torch.allclose(m.flatten(1).sum(1), lp, rtol=1e-9, atol=1e-6)
    # a constant image looks the same under every shift
    c = torch.full((1, 1, *shape), 0.1, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(t(c).log_p, g(c).log_p)
    assert t.config == g.config and t.initialized
    with pytest.raises(ValueError, match="already"):
        Translated(t, 1)
    with pytest.raises(ValueError, match="radius"):
        Translated(g, 0)


def test_bundle_records_and_restores_the_shift(tiny_bundle: Bundle, tmp_path: Path) -> None:
    src = tiny_bundle
    out = save_bundle(tmp_path / "tta", m0=Translated(src.m0, 1), m1=Translated(src.m1, 1),
                      preset="tiny-cxr", preprocessing=src.preprocessing,
                      calibration=src.calibration, name="tta")
    b = load_bundle(out)
    assert b.manifest["test_time_shift"] == 1
    assert isinstance(b.m0, Translated) and isinstance(b.m1, Translated) and b.m0.radius == 1
    assert "test_time_shift" not in src.manifest and not isinstance(src.m0, Translated)
    mixture, _ = blobs(5, (16, 16), abnormal=0.5, seed=9)
    x = dequantize(torch.from_numpy(mixture), b.preprocessing.n_bits, noise=False)
    with torch.no_grad():
        want = torch.stack([src.m0(translate(x, o)).log_p for o in translations(1, 2)]).mean(0)
    np.testing.assert_allclose(PosteriorScorer(b).score(mixture).log_p_normal, want.numpy(), rtol=1e-6)
    with pytest.raises(BundleError, match="must match"):
        save_bundle(tmp_path / "bad", m0=Translated(src.m0, 1), m1=src.m1, preset="tiny-cxr",
                    preprocessing=src.preprocessing, calibration=src.calibration, name="bad")
    _refuses_manifest_values(out, tmp_path, "test_time_shift", (-1, 99, "1", True))


def test_build_calibrates_on_the_averaged_scores(tmp_path: Path) -> None:
    from flows.build import BuildOptions, build_bundle, split_reference
    from flows.presets import get_preset

    normal, _ = blobs(32, (16, 16), seed=1)
    mixture, _ = blobs(32, (16, 16), abnormal=0.5, seed=2)
    b = build_bundle(tmp_path / "b", preset=get_preset("tiny-cxr"), normal=normal, mixture=mixture,
                     name="b", log=lambda s: None,
                     options=BuildOptions(epochs=1, finetune_epochs=1, progress=False, test_time_shift=1))
    assert b.manifest["test_time_shift"] == 1
    # the reference is the held-out mixture, scored the way the node scores: the bundle's own
    # scorer reproduces it
    opts = BuildOptions()
    _, held = split_reference(mixture, opts.reference_holdout, opts.min_reference, opts.seed)
    assert held is not None
    np.testing.assert_allclose(np.asarray(b.calibration.reference),
                               PosteriorScorer(b).score(held).score, rtol=1e-6)
    with pytest.raises(ValueError, match="test-time shift"):
        build_bundle(tmp_path / "x", preset=get_preset("tiny-cxr"), normal=normal, mixture=mixture,
                     name="x", log=lambda s: None,
                     options=BuildOptions(epochs=1, progress=False, test_time_shift=9))


def test_mirrored_views_average_the_image_and_its_mirror() -> None:
    cfg, shape = GlowConfig(1, 3, levels=2, steps=1, hidden=4, scale_fn="glow"), (4, 8, 8)
    g = _model(cfg, shape)
    t = Translated(g, 0, mirror_axis=2).eval()
    x = torch.rand(3, 1, *shape, dtype=torch.float64) - 0.5
    with torch.no_grad():
        lp, m = t(x).log_p, t.log_p_map(x)
        want = (g(x).log_p + g(x.flip(4)).log_p) / 2
        want_map = (g.log_p_map(x) + g.log_p_map(x.flip(4)).flip(3)) / 2
    assert torch.allclose(lp, want) and torch.allclose(m, want_map)
    assert torch.allclose(m.flatten(1).sum(1), lp, rtol=1e-9, atol=1e-6)
    with torch.no_grad():  # an image and its mirror image get the same score
        assert torch.allclose(t(x.flip(4)).log_p, lp)
    both = Translated(g, 1, mirror_axis=2)
    assert len(both.views(x)) == 54 and both.views(x)[0] == ((0, 0, 0), False)
    assert not both.same_views(Translated(g, 1)) and both.same_views(Translated(g, 1, 2))
    with pytest.raises(ValueError, match="mirror axis"):
        Translated(g, 0, mirror_axis=3)
    with pytest.raises(ValueError, match="radius"):
        Translated(g, 0)


def test_bundle_records_and_restores_the_mirror(tiny_bundle: Bundle, tmp_path: Path) -> None:
    src = tiny_bundle
    out = save_bundle(tmp_path / "m", m0=Translated(src.m0, 0, 1), m1=Translated(src.m1, 0, 1),
                      preset="tiny-cxr", preprocessing=src.preprocessing,
                      calibration=src.calibration, name="m")
    b = load_bundle(out)
    assert b.manifest["test_time_mirror"] == 1 and "test_time_shift" not in b.manifest
    assert isinstance(b.m0, Translated) and b.m0.mirror_axis == 1 and b.m0.radius == 0
    with pytest.raises(BundleError, match="must match"):
        save_bundle(tmp_path / "bad", m0=Translated(src.m0, 0, 1), m1=Translated(src.m1, 0, 0),
                    preset="tiny-cxr", preprocessing=src.preprocessing, calibration=src.calibration,
                    name="bad")
    _refuses_manifest_values(out, tmp_path, "test_time_mirror", (-1, 2, "1", True))


def test_training_mirrors_about_half_the_batch() -> None:
    from flows.train import _mirror

    x = torch.rand(400, 1, 2, 3, 5)
    y = _mirror(x, 2, torch.Generator().manual_seed(0))
    flipped = np.array([torch.equal(y[i], x[i].flip(3)) for i in range(len(x))])
    kept = np.array([torch.equal(y[i], x[i]) for i in range(len(x))])
    assert (flipped ^ kept).all() and 150 < flipped.sum() < 250
    assert _mirror(x, None, torch.Generator()) is x


def test_build_mirrors_only_where_the_preset_has_a_mirror_axis(tmp_path: Path) -> None:
    from flows.build import BuildOptions, build_bundle
    from flows.presets import get_preset

    normal, _ = blobs(16, (8, 16, 16), seed=1)
    mixture, _ = blobs(16, (8, 16, 16), abnormal=0.5, seed=2)
    b = build_bundle(tmp_path / "b", preset=get_preset("tiny-bct"), normal=normal, mixture=mixture,
                     name="b", log=lambda s: None,
                     options=BuildOptions(epochs=1, finetune_epochs=1, progress=False,
                                          train_mirror=True, test_time_mirror=True))
    assert b.manifest["test_time_mirror"] == 2
    img, _ = blobs(4, (8, 16, 16), seed=3)
    s = PosteriorScorer(b)
    np.testing.assert_allclose(s.score(img).score, s.score(img[..., ::-1].copy()).score, rtol=1e-5)
    with pytest.raises(ValueError, match="mirror axis"):
        flat, _ = blobs(16, (16, 16), seed=1)
        build_bundle(tmp_path / "x", preset=get_preset("tiny-cxr"), normal=flat, mixture=flat, name="x",
                     log=lambda s: None, options=BuildOptions(epochs=1, progress=False, train_mirror=True))
