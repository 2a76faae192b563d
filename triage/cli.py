"""The ``triage`` command line.

Heavy imports (torch, matplotlib) happen inside the commands so ``triage --help`` is quick.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from flows.preprocess import Preprocessing
    from triage.config import Settings

app = typer.Typer(help="DICOM/PACS AI triage node: normalizing-flow anomaly scores for CXR and CT.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console(stderr=True)


class Kind(StrEnum):
    cxr = "cxr"
    bct = "bct"
    chestct = "chestct"


DEFAULT_SHAPES = {"bct": "16,64,64", "chestct": "64,72,96"}


class SynthFormat(StrEnum):
    npz = "npz"
    dicom = "dicom"
    png = "png"
    png8 = "png8"
    jpeg = "jpeg"
    nifti = "nifti"


def _fail(msg: str) -> typer.Exit:
    console.print(f"[red]error:[/] {msg}")
    return typer.Exit(code=2)


@app.command()
def synth(
    kind: Annotated[Kind, typer.Argument(help="cxr (chest radiographs), bct (head CT) or chestct")],
    out: Annotated[Path, typer.Argument(help="output .npz file, or a folder for the other formats")],
    n: Annotated[int, typer.Option(help="number of cases")] = 1000,
    abnormal_fraction: Annotated[float, typer.Option(help="0 = all normal; 0.5 = a mixture")] = 0.0,
    size: Annotated[int, typer.Option(help="CXR image size (pixels)")] = 64,
    shape: Annotated[str | None, typer.Option(
        help="CT volume D,H,W (default 16,64,64 head CT; 64,72,96 chest CT at 4 mm)")] = None,
    spacing: Annotated[float, typer.Option(help="chest-CT voxel size (mm, isotropic)")] = 4.0,
    seed: Annotated[int, typer.Option(help="random seed; case i depends only on (seed, i)")] = 0,
    fmt: Annotated[SynthFormat, typer.Option(
        "--format", help="npz (one file); dicom (one study per case); png (16-bit), png8 or jpeg "
                         "radiographs; nifti volumes. Folders get a labels.csv and, for the "
                         "image files, a lesion mask per case (the forms `evaluate` reads)"),
    ] = SynthFormat.npz,
    quality: Annotated[int, typer.Option(help="JPEG quality (1-100) for --format jpeg")] = 90,
) -> None:
    """Generate a phantom data set with labelled abnormalities."""
    from flows.phantoms import make_cxr, make_headct
    from flows.phantoms.chestct import make_chestct

    if not 0.0 <= abnormal_fraction <= 1.0:
        raise _fail("--abnormal-fraction must be between 0 and 1")
    try:
        with console.status(f"generating {n} {kind.value} phantoms"):
            if kind is Kind.cxr:
                ps = make_cxr(n, size=size, abnormal_fraction=abnormal_fraction, seed=seed)
            else:
                dims = tuple(int(s) for s in (shape or DEFAULT_SHAPES[kind.value]).split(","))
                if len(dims) != 3:
                    raise ValueError("--shape must be three integers D,H,W")
                if kind is Kind.bct:
                    ps = make_headct(n, shape=dims, abnormal_fraction=abnormal_fraction,
                                     seed=seed)
                else:
                    ps = make_chestct(n, shape=dims, spacing_mm=spacing,
                                      abnormal_fraction=abnormal_fraction, seed=seed)
    except ValueError as e:
        raise _fail(str(e)) from e
    try:
        if fmt == "dicom":
            from triage.phantom_dicom import write_dicom_studies

            write_dicom_studies(ps, out, seed=seed)
        elif fmt == "npz":
            out.parent.mkdir(parents=True, exist_ok=True)
            ps.save_npz(out)
        else:
            from triage.phantom_files import write_image_files

            write_image_files(ps, out, fmt.value, quality=quality)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from e
    counts = {f: ps.findings.count(f) for f in sorted(set(ps.findings))}
    console.print(f"wrote {n} {kind.value} cases to {out}: {counts}")


NO_LABELS = ("no labels (use a phantom .npz, an .npz with images and labels arrays, or a folder "
             "with a labels.csv: see `triage evaluate --help`)")


def _phantom_set(path: Path) -> Any:
    """The phantom set in ``path`` (an .npz `triage synth` wrote), or None."""
    from flows.phantoms import PhantomSet

    if path.suffix != ".npz" or not path.is_file():
        return None
    try:
        return PhantomSet.load_npz(path)
    except KeyError:  # another .npz: images and labels only (triage.labelled)
        return None


def _load_set(path: Path, prep: Preprocessing, store: Path | None = None, normals_only: bool = False
              ) -> tuple[object, object, object]:
    """(preprocessed images, labels or None, phantom set or None) from .npz / folder. Images
    may differ in size (each is preprocessed on its own as it is read, into one array of
    model-grid copies: on disk at ``store`` when it would not fit in memory); a labelled set
    (triage.labelled) gives labels."""
    from flows.train import load_images
    from triage.labelled import folder_readers, has_labels, read_labelled

    ps = _phantom_set(path)
    if ps is not None:
        if normals_only:
            _all_normal(ps.labels, path)
        return prep.apply(ps.images), ps.labels, ps
    if has_labels(path):
        ls = read_labelled(path, volumes=prep.ndim == 3)
        if normals_only:  # (``--normal``) before any pixel is read
            _all_normal(ls.labels, path)
        return _on_model_grid(ls, len(ls), prep, store), ls.labels, None
    if path.is_dir():  # DICOM series and image files, each brought onto the model grid as read
        readers = folder_readers(path, volumes=prep.ndim == 3)
        grids = _on_model_grid((read() for read in readers), len(readers), prep, store)
        if len(grids):
            return grids, None, None
    raw = load_images(path, prep.ndim)
    return prep.apply(raw), None, None


def _memory_budget() -> float:
    """Bytes a training set may take in memory: a quarter of what the system has available
    (Linux MemAvailable), the rest left to the models, the batches and everything else."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 4
    except (OSError, ValueError, IndexError):
        pass
    return float("inf")  # unknown: in memory, as before


def _on_model_grid(series: Iterable[Any], n: int, prep: Preprocessing, store: Path | None = None
                   ) -> Any:
    """The images of ``prep``'s dimension among ``n`` series, preprocessed one at a time into
    one preallocated array (no list of copies to concatenate: the set is in memory once). When
    that array would exceed :func:`_memory_budget` and ``store`` is given, it is a memory-mapped
    ``.npy`` file there instead: training reads its batches from disk through the page cache,
    so a set larger than the machine's memory still trains."""
    import numpy as np

    from triage.labelled import case_name

    out: np.ndarray | None = None
    k = 0
    for s in series:
        if s.array.ndim != prep.ndim:
            continue
        try:
            g = prep.apply(s.array[None])
        except ValueError as exc:
            raise ValueError(f"{case_name(s)}: {exc}") from exc
        if out is None:
            shape = (n, *g.shape[1:])
            nbytes = float(np.prod(shape)) * g.dtype.itemsize
            if store is not None and nbytes > _memory_budget():
                store.parent.mkdir(parents=True, exist_ok=True)
                console.print(f"{n} images on the model grid ({nbytes / 2**30:.1f} GiB) exceed a "
                              f"quarter of the free memory: kept on disk in {store}")
                out = np.lib.format.open_memmap(store, mode="w+", dtype=g.dtype, shape=shape)
            else:
                out = np.empty(shape, dtype=g.dtype)
        out[k] = g[0]
        k += 1
    return out[:k] if out is not None else np.empty((0, 1, *prep.shape), dtype=np.float32)


def _load_volumes(path: Path) -> tuple[Any, Any]:
    """CT volumes in HU on their own grids, each read from disk when reached (a phantom set is
    in memory already): (flows.patchbundle.VolumeSet, labels or None)."""
    import numpy as np

    from triage.labelled import Volumes, folder_readers, has_labels, read_labelled

    ps = _phantom_set(path)
    if ps is not None:
        return ps.volumes(), np.asarray(ps.labels, dtype=np.int64)
    if has_labels(path):
        ls = read_labelled(path, volumes=True)
        return Volumes(ls.readers), ls.labels
    if not path.is_dir():
        raise ValueError(f"{path}: not a set of volumes (a phantom or labelled .npz, or a folder of "
                         "DICOM series or NIfTI files)")
    vols = Volumes(folder_readers(path, volumes=True))
    if not len(vols):
        raise ValueError(f"{path}: no CT volumes found (DICOM series or NIfTI files)")
    return vols, None


def _all_normal(labels: Any, path: Path) -> None:
    """A labelled set given as ``--normal`` must hold normal cases only (M0 is the normal model)."""
    import numpy as np

    if labels is not None and np.any(np.asarray(labels) != 0):
        k, n = int(np.count_nonzero(labels)), len(labels)
        raise ValueError(f"{path}: --normal holds {k} of {n} cases labelled abnormal; the normal set "
                         "must be all normal (drop those rows, or give the set as --mixture)")


def _train_patch_bundle(p: object, out: Path, normal: Path, mixture: Path, validation: Path | None,
                        name: str, version: str, options: object) -> None:
    from flows.patchbundle import build_patch_bundle

    if validation is None:
        raise ValueError("a patch bundle calibrates its map on a labelled --validation set")
    nv, nl = _load_volumes(normal)  # lazy: the labels are checked before any pixel is read
    _all_normal(nl, normal)
    mv, _ = _load_volumes(mixture)
    vv, vl = _load_volumes(validation)
    if vl is None:
        raise ValueError(f"{validation}: {NO_LABELS}")
    build_patch_bundle(out, preset=p, normal=nv, mixture=mv, validation=(vv, vl),  # type: ignore[arg-type]
                       name=name, version=version, options=options,  # type: ignore[arg-type]
                       log=console.print)


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="preset name (see `triage presets`)")] = "cpu-cxr",
    out: Annotated[Path, typer.Option(help="output: a bundle directory, or a model directory")] = Path(
        "runs/bundle"),
    normal: Annotated[Path | None, typer.Option(
        help="normal images: .npz/.npy, or a folder of DICOM series, PNG/JPEG/TIFF or NIfTI files")] = None,
    mixture: Annotated[Path | None, typer.Option(help="unlabelled mixture images")] = None,
    data: Annotated[Path | None, typer.Option(help="train ONE model on these images instead")] = None,
    validation: Annotated[Path | None, typer.Option(
        help="labelled set (as for `evaluate --data`): threshold, score choice, map calibration")] = None,
    name: Annotated[str | None, typer.Option(help="bundle name")] = None,
    version: Annotated[str, typer.Option(help="bundle version")] = "1",
    strategy: Annotated[str | None, typer.Option(
        help="shared | conditional | independent | finetune-m1 | finetune-m0 (default: preset's)")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="override the preset's epochs, trained as given (by default a set smaller than the "
             "preset's reference gets more epochs, up to the preset's floor of steps)")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(
        help="override fine-tuning epochs, trained as given (no floor of steps)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override the preset's batch size")] = None,
    seed: Annotated[int, typer.Option(help="random seed (initialisation, order, dequantisation)")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto)")] = None,
    resume: Annotated[bool, typer.Option(
        help="continue an interrupted run from its checkpoints: out/checkpoint.pt for one model, "
             "out/work/*/checkpoint.pt for each model of a bundle (a model fine-tuned from one "
             "that trained further starts afresh)")] = False,
    members: Annotated[int, typer.Option(
        help="train this many (M0, M1) pairs with different seeds and average their "
             "log-densities (an ensemble: less training noise in the score, k times the time)")] = 1,
    noise_floor: Annotated[float, typer.Option(
        help="CT patch presets: top every volume's noise up to this percentile (0-100) of the "
             "training volumes' noise x 1.2, so scans of different dose look alike to the "
             "models (recorded in the bundle; 0: off)")] = 0.0,
    test_time_shift: Annotated[int | None, typer.Option(
        help="whole-image presets: score every image as the mean over its translations within "
             "this many pixels ((2r+1)^2 per radiograph, (2r+1)^3 per volume: that many times the "
             "scoring time; recorded in the bundle; default: the preset's, 0: off)")] = None,
    crop_above: Annotated[float | None, typer.Option(
        help="whole-image CT presets: crop every volume to its foreground (the largest "
             "connected region above this value, e.g. -300 HU) before resizing it onto the "
             "model grid, so field of view and head size do not move the score (recorded in "
             "the bundle; default: the preset's)")] = None,
    mirror: Annotated[bool | None, typer.Option(
        "--mirror/--no-mirror",
        help="head-CT presets: mirror half the training volumes left-right and score every "
             "volume as the mean over it and its mirror image (2x the scoring time; recorded in "
             "the bundle; default: the preset's, off)")] = None,
) -> None:
    """Train a bundle (--normal + --mixture) or a single model (--data)."""
    from flows.build import BuildOptions, build_bundle
    from flows.presets import get_preset
    from flows.train import TrainOptions
    from flows.train import train as train_one

    sets = out / "work" / "sets"  # training sets too large for memory, memory-mapped (removed after)
    try:
        p = get_preset(preset)
        if crop_above is not None:
            if p.preprocessing.spacing is not None or p.preprocessing.intensity != "window":
                raise ValueError("--crop-above is for whole-image CT presets (HU values); a patch "
                                 "preset resamples volumes to its spacing instead")
            p = p.with_overrides(preprocessing=replace(p.preprocessing, crop_above=crop_above))
        if mirror and p.mirror_axis is None:
            raise ValueError(f"--mirror: preset {p.name} has no mirror axis (its anatomy is not "
                             "left-right symmetric)")
        if data is not None:
            imgs, _, _ = _load_set(data, p.preprocessing, sets / "data.npy")
            opts = TrainOptions.from_preset(p, epochs=epochs, batch_size=batch_size, seed=seed)
            if mirror is not None:
                opts = replace(opts, augment_mirror=p.mirror_axis if mirror else None)
            res = train_one(imgs, p, out_dir=out, options=opts, resume=resume, device=device)  # type: ignore[arg-type]
            import torch

            torch.save(res.model.state_dict(), out / "model.pt")
            (out / "model.json").write_text(json.dumps({"preset": p.name, **res.metrics}, indent=2))
            console.print(f"model written to {out / 'model.pt'} (val {res.best_val_bpd:.3f} bits/dim)")
            return
        if normal is None or mixture is None:
            raise ValueError("give --normal and --mixture for a bundle, or --data for one model")
        if noise_floor:
            if p.preprocessing.spacing is None or not 0 < noise_floor <= 100:
                raise ValueError("--noise-floor is a percentile in (0, 100] and only for CT patch presets")
            p = p.with_overrides(noise_floor_percentile=noise_floor)
        if test_time_shift and p.preprocessing.spacing is not None:
            raise ValueError("--test-time-shift is for whole-image presets; a patch map already "
                             "averages overlapping patches")
        if p.preprocessing.spacing is not None:  # a patch preset: volumes on their own grids
            _train_patch_bundle(p, out, normal, mixture, validation, name or out.name, version,
                                BuildOptions(strategy=strategy, seed=seed, epochs=epochs,  # type: ignore[arg-type]
                                             finetune_epochs=finetune_epochs,
                                             batch_size=batch_size, device=device, members=members,
                                             resume=resume))
            return
        n_imgs, _, _ = _load_set(normal, p.preprocessing, sets / "normal.npy", normals_only=True)
        m_imgs, _, _ = _load_set(mixture, p.preprocessing, sets / "mixture.npy")
        val = None
        if validation is not None:
            v_imgs, v_labels, _ = _load_set(validation, p.preprocessing, sets / "validation.npy")
            if v_labels is None:
                raise ValueError(f"{validation}: {NO_LABELS}, or give none")
            val = (v_imgs, v_labels)
        build_bundle(out, preset=p, normal=n_imgs, mixture=m_imgs, name=name or out.name,  # type: ignore[arg-type]
                     version=version, validation=val,  # type: ignore[arg-type]
                     options=BuildOptions(strategy=strategy, seed=seed, epochs=epochs,  # type: ignore[arg-type]
                                          finetune_epochs=finetune_epochs, batch_size=batch_size,
                                          device=device, members=members,
                                          test_time_shift=test_time_shift, resume=resume,
                                          train_mirror=mirror, test_time_mirror=mirror),
                     log=console.print)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    finally:
        shutil.rmtree(sets, ignore_errors=True)


@app.command()
def calibrate(
    bundle: Annotated[Path, typer.Option(help="patch bundle directory (rewritten in place)")],
    validation: Annotated[Path, typer.Option(help="labelled CT volumes (as for `evaluate --data`)")],
) -> None:
    """Re-calibrate a CT patch bundle's map on a labelled set, without retraining.

    Chooses the map (likelihood or posterior ratio, per patch or per voxel), its voxel
    threshold, T and the reference of normal abnormal-volumes that percentiles are read
    against; the manifest's hashes are updated. The set is any labelled set of volumes in HU
    (a labelled .npz, or a folder of DICOM series or NIfTI files with a labels.csv: the forms
    in models/README.md), e.g. a site's own volumes, read one at a time. The bundle
    keeps its name and version; a running node uses the new calibration after a restart.
    """
    from flows.bundle import BundleError, load_bundle
    from flows.patchbundle import calibrate_patch_bundle, map_calibration

    try:
        b = load_bundle(bundle)
        old = map_calibration(b)
        vv, vl = _load_volumes(validation)
        if vl is None:
            raise ValueError(f"{validation}: {NO_LABELS}")
        calibrate_patch_bundle(b, (vv, vl), overlap=old.overlap, mask=old.mask,
                               min_mask_fraction=old.min_mask_fraction, min_size_cm3=old.min_size_cm3,
                               log=console.print)
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise _fail(str(e)) from e


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="bundle directory")],
    data: Annotated[Path, typer.Option(
        help="labelled test set: an .npz with images and labels (e.g. from `triage synth`), or a "
             "folder with a labels.csv: columns label, finding, and series_instance_uid or "
             "study_instance_uid (DICOM studies) or file and optional mask (PNG/JPEG/TIFF, NIfTI)")],
    out: Annotated[Path, typer.Option(help="report directory")] = Path("runs/eval"),
    n_boot: Annotated[int, typer.Option(help="bootstrap draws for the CIs")] = 1000,
) -> None:
    """Score a labelled set: AUROC with CIs, histograms, montages, confound plots."""
    from flows.bundle import BundleError, load_bundle
    from flows.evaluate import evaluate as run_eval
    from flows.evaluate import format_auc
    from flows.phantoms.baselines import trivial_baselines
    from flows.posterior import PosteriorScorer
    from triage.labelled import case_name, read_labelled

    try:
        b = load_bundle(bundle)
        if b.extra("patchmap.json") is not None:
            _evaluate_patch_bundle(b, data, out, n_boot)
            return
        import numpy as np

        ps = _phantom_set(data)
        grid, radiographs = b.preprocessing.shape, b.preprocessing.ndim == 2
        truth: list[Any] | None  # radiographs' lesion masks on the model grid, where given
        if ps is None:  # a labelled folder or .npz: images of any size, read one at a time
            ls = read_labelled(data, volumes=not radiographs)
            _both_classes(ls.labels, data)
            findings, truth = ls.findings, [] if ls.has_masks and radiographs else None
            imgs, per = np.empty((len(ls), 1, *grid), dtype=np.float32), []
            for i, (x, mask) in enumerate(ls.cases()):  # into one preallocated array, no copies
                try:
                    g, box = b.preprocessing.apply_with_boxes(x.array[None])
                except ValueError as exc:
                    raise ValueError(f"{case_name(x)}: {exc}") from exc
                imgs[i] = g[0]
                per.append(trivial_baselines(_display(x.array, b.kind)[None], kind=b.kind))
                if truth is not None and mask is not None:
                    truth.append(_mask_on_grid(mask, box[0], grid))
            base = {k: np.concatenate([p[k] for p in per]) for k in per[0]}
        else:
            _both_classes(ps.labels, data)
            findings = ps.findings
            imgs, boxes = b.preprocessing.apply_with_boxes(ps.images)
            truth = [_mask_on_grid(m, box, grid) for m, box in zip(ps.masks[:, 0], boxes, strict=True)
                     ] if radiographs else None
            base = trivial_baselines(ps.images, kind=b.kind)
        with console.status(f"scoring {len(imgs)} images"):
            s, maps = PosteriorScorer(b).score_maps(imgs) if radiographs else (
                PosteriorScorer(b).score(imgs), None)
        chosen = {} if s.method == "whole" else {f"posterior {s.method}": s.score}
        scores = {**chosen, "posterior": s.abnormality, "likelihood": -s.log_p_normal,
                  **{f"baseline_{k}": v for k, v in base.items()}}
        classes = ["normal", *sorted({f for f in findings if f != "normal"})]
        labels = [classes.index(f) for f in findings]
        zero = ps.zero_fraction if ps is not None else base["background_fraction"]
        summary = run_eval(out, labels=np.asarray(labels), findings=classes, scores=scores,
                           images=imgs, zero_fraction=zero, n_boot=n_boot,
                           title=f"{b.name} on {data.name}",
                           extra={"bundle": b.name, "preset": b.manifest.get("preset"),
                                  "data": str(data)})
        loc: dict[str, Any] = {}
        if maps is not None:
            _radiograph_overlays(imgs, maps, s.score, findings, out)
            if truth is not None:  # lesion masks: where the map points
                loc = _radiograph_localisation(b, maps, truth, findings, out)
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise _fail(str(e)) from e
    table = Table(title=f"{b.name} on {data.name}")
    table.add_column("score")
    table.add_column("AUROC [95% CI]")
    for name, entry in summary["scores"].items():
        o = entry["overall"]
        table.add_row(name, format_auc(o, 3))
    Console().print(table)
    if loc.get("findings"):
        lt = Table(title="localisation: the map against the lesion masks")
        for c in ("finding", "n", "pointing (chance)", f"top {100 * loc['top_fraction']:g} % hit",
                  "overlay hit"):
            lt.add_column(c)
        for f, row in loc["findings"].items():
            lt.add_row(f, str(row["n"]), f"{row['pointing']:.2f} ({row['chance']:.2f})",
                       f"{row['top_hit']:.2f}", f"{row['overlay_hit']:.2f}" if "overlay_hit" in row else "-")
        Console().print(lt)
    console.print(f"report: {out / 'summary.md'}")


def _display(raw: Any, kind: str) -> Any:
    """A DICOM image as the phantoms' baselines read it: a radiograph min-max scaled to [0, 1]
    (its collimated background at 0), a CT in HU as it is."""
    import numpy as np

    from flows.preprocess import rescale

    a = np.asarray(raw, dtype=np.float32)
    return rescale(a) if kind == "cxr" else a


def _mask_on_grid(mask: Any, box: tuple[slice, ...], grid: tuple[int, ...]) -> Any:
    """A lesion mask on the source grid -> the model grid, over the region the model saw
    (``box``): lesion where at least a quarter of a model pixel is."""
    import numpy as np
    from scipy import ndimage

    seen = np.asarray(mask)[box]
    if seen.shape == tuple(grid):
        return seen.astype(bool)
    zoom = [a / b for a, b in zip(grid, seen.shape, strict=True)]
    return ndimage.zoom(seen.astype(np.float32), zoom, order=1) > 0.25


def _radiograph_localisation(b: object, maps: object, truth: list[Any], findings: list[str],
                             out: Path) -> dict[str, Any]:
    """Localisation figures of the node's radiograph map (``truth``: the lesion masks on the
    model grid), appended to the report."""
    import numpy as np

    from flows.mapeval import localisation_markdown, radiograph_localisation
    from triage.analyze import POSTERIOR_MAP_Z

    m = np.asarray(maps)[:, 0] if np.asarray(maps).ndim == 4 else np.asarray(maps)
    threshold = POSTERIOR_MAP_Z if b.map_reference is not None else None  # type: ignore[attr-defined]
    loc = radiograph_localisation(m, np.asarray(truth), findings, threshold=threshold)
    (out / "localisation.json").write_text(json.dumps(loc, indent=2))
    with open(out / "summary.md", "a") as f:
        f.write("\n" + localisation_markdown(loc))
    return loc


def _radiograph_overlays(imgs: object, maps: object, score: object, findings: list[str],
                         out: Path, n: int = 12) -> None:
    """The node's abnormality maps (those it sends as overlays) over the most abnormal radiographs."""
    import numpy as np

    from flows.mapeval import map_montage

    arr, m = np.asarray(imgs), np.asarray(maps)
    top = np.argsort(-np.asarray(score))[:n]
    titles = [f"#{k + 1} case {i}: {findings[i]}" for k, i in enumerate(top)]
    map_montage(arr[top, 0], m[top].reshape(arr[top, 0].shape), titles, out / "overlays_most_abnormal.png",
                title="abnormality map as the node computes it, most abnormal first")


def _both_classes(labels: Any, data: Path) -> None:
    """A whole-image report (ROC, histograms per class) needs normal and abnormal cases: say so
    before any pixel is scored. (A patch bundle's report takes one class: its specificity.)"""
    import numpy as np

    y = np.asarray(labels)
    if y.size and (y == y[0]).all():
        raise ValueError(f"{data}: all {y.size} cases are label {int(y[0])} "
                         f"({'abnormal' if y[0] else 'normal'}); this report needs both classes")


def _labelled_volumes(data: Path) -> tuple[int, Iterator[tuple[Any, tuple[float, ...], int, str, Any, str]]]:
    """How many cases a labelled set of CT volumes holds, and (volume in HU, spacing, label,
    finding, lesion mask or None, name) per case, read as reached: a phantom set, or anything
    triage.labelled reads."""
    from triage.labelled import case_name, has_labels, read_labelled

    ps = _phantom_set(data)
    if ps is not None:
        try:
            vols = ps.volumes()
        except ValueError as e:
            raise ValueError(f"{data}: {e}") from e
        return len(ps), ((v, sp, int(ps.labels[i]), ps.findings[i], ps.masks[i, 0], f"case {i}")
                         for i, (v, sp) in enumerate(vols))
    if not has_labels(data):
        raise ValueError(f"{data}: evaluation needs labels: {NO_LABELS}")
    ls = read_labelled(data, volumes=True)
    return len(ls), ((s.array, s.spacing, int(label), finding, mask, case_name(s))
                     for (s, mask), label, finding in zip(ls.cases(), ls.labels, ls.findings, strict=True))


def _evaluate_patch_bundle(b: object, data: Path, out: Path, n_boot: int) -> None:
    from rich.progress import track

    from flows.evaluate import format_auc
    from flows.mapeval import case_from_result, compare_maps, write_report
    from flows.patchbundle import PatchMapScorer

    scorer = PatchMapScorer(b)  # type: ignore[arg-type]
    n, volumes = _labelled_volumes(data)
    cases = []  # compact: each volume is dropped once its map is read (flows.mapeval.CaseMap)
    sizes: dict[str, list[float]] = {}  # every calibrated map's abnormal volume, side by side
    outside: list[tuple[str, list[str]]] = []  # cases unlike the validation volumes, and why
    for v, sp, label, finding, truth, case in track(volumes, total=n, description="mapping volumes",
                                                    console=console):
        try:
            r, all_sizes = scorer.score_all(v, sp)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"{case}: {exc}") from exc
        for name, size in all_sizes.items():
            sizes.setdefault(name, []).append(size)
        if r.domain.get("outside"):
            outside.append((case, r.domain["outside"]))
        cases.append(case_from_result(v, r, scorer.cal.voxel_threshold, label=label,
                                      finding=finding, truth=truth, spacing=sp))
    window = (-1000.0, 300.0) if b.kind == "chestct" else (-20.0, 100.0)  # type: ignore[attr-defined]
    maps = compare_maps([c.label for c in cases], sizes, scorer.cal.name, n_boot=n_boot)
    summary = write_report(out, cases, title=f"{b.name} on {data.name}",  # type: ignore[attr-defined]
                           window=window, n_boot=n_boot,
                           extra={"bundle": b.name, "map": scorer.cal.name,  # type: ignore[attr-defined]
                                  "T_cm3": scorer.cal.size_threshold_cm3, "maps": maps,
                                  "outside_domain": [{"case": c, "why": w} for c, w in outside]})
    table = Table(title=f"{b.name} on {data.name} ({scorer.cal.name} map)")  # type: ignore[attr-defined]
    table.add_column("metric")
    table.add_column("value")
    for key in ("auroc_abnormal_volume", "auroc_peak"):
        if key in summary:
            e = summary[key]
            table.add_row(key, format_auc(e, 3))
    for key in ("f1", "accuracy", "hit_rate_ge_1cm3", "dice_abnormal_mean"):
        if summary.get(key) is not None:
            table.add_row(key, f"{summary[key]:.3f}")
    for name, e in maps.items():  # the other maps, side by side
        diff = e.get("minus_chosen")
        table.add_row(f"map {name}", format_auc(e, 3)
                      + (f", {diff['difference']:+.3f} vs chosen" if diff else " (chosen)"))
    Console().print(table)
    if outside:
        first, why = outside[0]
        console.print(f"[yellow]{len(outside)} of {n} volumes lie outside the bundle's validation "
                      f"volumes[/] (first: {first}: {'; '.join(why)}): their scores are "
                      "extrapolations; summary.json lists them")
    console.print(f"report: {out / 'summary.md'}")


@app.command()
def sample(
    bundle: Annotated[Path, typer.Option(help="bundle directory")],
    out: Annotated[Path, typer.Option(help="output PNG")] = Path("runs/samples.png"),
    model: Annotated[str, typer.Option(help="m0 (normal) or m1 (mixture)")] = "m0",
    n: Annotated[int, typer.Option(help="number of samples")] = 16,
    temperature: Annotated[float, typer.Option(help="prior temperature (0.6-0.8 looks best)")] = 0.7,
    seed: Annotated[int, typer.Option(help="random seed of the draw")] = 0,
) -> None:
    """Draw fictional images from a bundle's model (like Shibata et al.'s Fig. 15)."""
    import torch

    from flows.bundle import BundleError, load_bundle
    from flows.evaluate import save_samples

    try:
        b = load_bundle(bundle)
        if model not in ("m0", "m1"):
            raise ValueError("--model must be m0 or m1")
        g = b.m0 if model == "m0" else b.m1
        x = g.sample(n, b.preprocessing.shape, temperature=temperature,
                     generator=torch.Generator().manual_seed(seed))
        imgs = (x.clamp(-0.5, 0.5) + 0.5).cpu().numpy()
        save_samples(out, imgs, title=f"{b.name} {model}, temperature {temperature:g}")
    except (ValueError, BundleError) as e:
        raise _fail(str(e)) from e
    console.print(f"wrote {n} samples to {out}")


@app.command()
def presets() -> None:
    """List the training presets."""
    from flows.presets import PRESETS

    table = Table(title="presets")
    for col in ("name", "kind", "grid", "L", "K", "width", "batch", "lr", "epochs", "min steps",
                "description"):
        table.add_column(col)
    for p in PRESETS.values():
        g = p.glow
        floor = f"{p.min_steps} + {p.finetune_min_steps}" if p.min_steps or p.finetune_min_steps else "-"
        table.add_row(p.name, p.kind, "x".join(map(str, p.preprocessing.shape)), str(g.levels),
                      str(g.steps), str(g.hidden), str(p.batch_size), f"{p.lr:g}", str(p.epochs),
                      floor, p.description)
    Console().print(table)


# --------------------------------------------------------------------------- the node

VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log at DEBUG level")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c",
    help="TOML configuration file (default: $TRIAGE_CONFIG); TRIAGE_* variables override it")]
db_app = typer.Typer(help="The node's database: schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _settings(config: Path | None) -> Settings:
    from triage.config import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None,
               revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the database schema (idempotent)."""
    from storage.db import Database
    from storage.migrate import current_revision, upgrade

    s = _settings(config)
    db = Database(s.database_url)
    before = current_revision(db)
    upgrade(db, revision)
    console.print(f"database {db.engine.url.render_as_string(hide_password=True)}: "
                  f"{before or 'empty'} -> {current_revision(db)}")


@db_app.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Show the schema revision of the database and the newest one this software knows."""
    from storage.db import Database
    from storage.migrate import current_revision, head_revision

    s = _settings(config)
    db = Database(s.database_url)
    cur, head = current_revision(db), head_revision(db)
    hint = "" if cur == head else " (run `triage db upgrade`)"
    console.print(f"current {cur or 'empty'}, head {head}{hint}")
    if cur != head:
        raise typer.Exit(code=1)


def _log_level(verbose: bool) -> int:
    import logging

    return logging.DEBUG if verbose else logging.INFO


@app.command()
def serve(config: ConfigOpt = None,
          verbose: VerboseOpt = False) -> None:
    """Run the node: storage SCP (own process), series assembly, routing and the executor."""
    from triage.serve import Node, _configure_logging, stop_on_signals

    s = _settings(config)
    _configure_logging(_log_level(verbose))
    stop = stop_on_signals()
    node = Node(s, log_level=_log_level(verbose)).start()
    r = s.receive
    console.print(f"[green]triage node up[/]: AE {r.ae_title} on port {node.port}, "
                  f"executor {s.executor.kind}, database {s.database_url.split('://')[0]}")
    node.wait(stop)


@app.command()
def receive(config: ConfigOpt = None,
            verbose: VerboseOpt = False) -> None:
    """Run only the storage SCP (for set-ups that run each part as its own service)."""
    from triage.serve import prepare_database, run_scp

    s = _settings(config)
    prepare_database(s, migrate=False).dispose()
    run_scp(s, _log_level(verbose))


@app.command()
def worklist(config: ConfigOpt = None,
             limit: Annotated[int, typer.Option(help="rows")] = 50,
             kind: Annotated[str | None, typer.Option(help="cxr, bct or chestct")] = None,
             min_priority: Annotated[int | None, typer.Option(help="only levels 1..N (1 = urgent)")] = None,
             phi: Annotated[bool, typer.Option(help="show patient names and IDs")] = False) -> None:
    """The studies in reading order: priority, then abnormality, then arrival."""
    from storage.db import Database
    from triage.rank import worklist as ranked

    s = _settings(config)
    db = Database(s.database_url)
    with db.sessions() as session:
        rows = ranked(session, limit=limit, kind=kind, min_priority=min_priority)
    table = Table(title=f"worklist ({len(rows)} studies)")
    cols = ["#", "priority", "percentile", "score", "kind", "state", "arrived (UTC)", "accession",
            *(["patient", "patient ID"] if phi else []), "description"]
    for c in cols:
        table.add_column(c)
    style = {1: "bold red", 2: "red", 3: "yellow", 4: "green"}
    for i, r in enumerate(rows, 1):
        level = f"[{style.get(r.priority or 0, 'dim')}]{r.priority or '-'} {r.priority_name}[/]"
        table.add_row(str(i), level,
                      "" if r.percentile is None else f"{r.percentile:.1f}",
                      "" if r.score is None else f"{r.score:.3g}", ",".join(r.kinds), r.state,
                      r.arrived.strftime("%Y-%m-%d %H:%M:%S"), r.accession_number or "",
                      *([r.patient_name or "", r.patient_id or ""] if phi else []), r.study_description or "")
    Console().print(table)


deliveries_app = typer.Typer(help="Result deliveries to the PACS: list, retry dead letters, cancel.",
                             no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")


@deliveries_app.command("list")
def deliveries_list(config: ConfigOpt = None,
                    state: Annotated[str | None, typer.Option(
                        help="pending, sending, sent, dead, cancelled")] = None,
                    limit: Annotated[int, typer.Option(help="rows, newest first")] = 50) -> None:
    """Deliveries, newest first (dead letters and retries show their last error)."""
    from pydicom.uid import UID
    from sqlalchemy import select

    from storage.db import Database
    from storage.models import Delivery

    db = Database(_settings(config).database_url)
    with db.sessions() as s:
        q = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        rows = list(s.scalars(q if state is None else q.where(Delivery.state == state)))
    _print_outbox(f"deliveries ({len(rows)})", "destination", "object",
                  [(d.id, d.result_id, d.destination, UID(d.sop_class_uid).name, d.state, d.attempts,
                    d.next_attempt_at, d.last_error) for d in rows])


def _print_outbox(title: str, target: str, what: str,
                  rows: list[tuple[int, int, str, str, str, int, dt.datetime, str | None]]) -> None:
    """Deliveries or notifications as a table: (id, result, target, what, state, attempts, next, error)."""
    table = Table(title=title)
    for c in ("id", "result", target, what, "state", "attempts", "next try (UTC)", "last error"):
        table.add_column(c)
    for i, result, tgt, w, state, attempts, nxt, error in rows:
        table.add_row(str(i), str(result), tgt, w, state, str(attempts), nxt.strftime("%Y-%m-%d %H:%M:%S"),
                      (error or "")[:60])
    Console().print(table)


def _outbox_action(outbox: Any, ids: list[int], action: str, noun: str) -> None:
    """``outbox.retry`` or ``outbox.cancel`` (a Sender or a Notifier) for each id, as the CLI."""
    failed = [i for i in ids if not getattr(outbox, action)(i, actor="cli")]
    if failed:
        raise _fail(f"cannot {action} {noun} {failed} (unknown, or already sent)")
    console.print(f"{action}: {len(ids)} {noun}")


def _delivery_action(config: Path | None, ids: list[int], action: str) -> None:
    from storage.blobs import BlobStore
    from storage.db import Database
    from triage.dispatch import Sender

    s = _settings(config)
    _outbox_action(Sender(Database(s.database_url), BlobStore(s.blob_root), s.dispatch), ids, action,
                   "deliveries")


@deliveries_app.command("retry")
def deliveries_retry(ids: Annotated[list[int], typer.Argument(help="delivery ids")],
                     config: ConfigOpt = None) -> None:
    """Send dead (or waiting) deliveries again at the next pass."""
    _delivery_action(config, ids, "retry")


@deliveries_app.command("cancel")
def deliveries_cancel(ids: Annotated[list[int], typer.Argument(help="delivery ids")],
                      config: ConfigOpt = None) -> None:
    """Give up on pending or dead deliveries."""
    _delivery_action(config, ids, "cancel")


notifications_app = typer.Typer(help="Webhook and HL7 notifications of urgent results: list, retry, cancel.",
                                 no_args_is_help=True)
app.add_typer(notifications_app, name="notifications")


@notifications_app.command("list")
def notifications_list(config: ConfigOpt = None,
                       state: Annotated[str | None, typer.Option(
                           help="pending, sending, sent, dead, cancelled")] = None,
                       limit: Annotated[int, typer.Option(help="rows, newest first")] = 50) -> None:
    """Notifications, newest first (dead letters and retries show their last error)."""
    from sqlalchemy import select

    from storage.db import Database
    from storage.models import Notification

    db = Database(_settings(config).database_url)
    with db.sessions() as s:
        q = select(Notification).order_by(Notification.id.desc()).limit(limit)
        rows = list(s.scalars(q if state is None else q.where(Notification.state == state)))
    _print_outbox(f"notifications ({len(rows)})", "receiver", "channel",
                  [(n.id, n.result_id, n.target, n.channel, n.state, n.attempts, n.next_attempt_at,
                    n.last_error) for n in rows])


def _notification_action(config: Path | None, ids: list[int], action: str) -> None:
    from storage.db import Database
    from triage.notify import Notifier

    s = _settings(config)
    _outbox_action(Notifier(Database(s.database_url), s), ids, action, "notifications")


@notifications_app.command("retry")
def notifications_retry(ids: Annotated[list[int], typer.Argument(help="notification ids")],
                        config: ConfigOpt = None) -> None:
    """Send dead (waiting or cancelled) notifications again at the next pass."""
    _notification_action(config, ids, "retry")


@notifications_app.command("cancel")
def notifications_cancel(ids: Annotated[list[int], typer.Argument(help="notification ids")],
                         config: ConfigOpt = None) -> None:
    """Give up on pending or dead notifications."""
    _notification_action(config, ids, "cancel")


@app.command()
def web(config: ConfigOpt = None,
        verbose: VerboseOpt = False) -> None:
    """Run only the web page, the API and /metrics (for set-ups that scale parts apart)."""
    import uvicorn

    from triage.serve import _configure_logging
    from triage.web import server_config
    from triage.web.api import create_app

    s = _settings(config)
    _configure_logging(_log_level(verbose))
    # the settings `triage serve` uses (no access log: request paths carry patient names)
    cfg = server_config(create_app(s), s.web.host, s.web.port, log_level="debug" if verbose else "info")
    uvicorn.Server(cfg).run()


user_app = typer.Typer(help="Web users and API tokens.", no_args_is_help=True)
app.add_typer(user_app, name="user")


@user_app.command("add")
def user_add(username: Annotated[str, typer.Argument()],
             role: Annotated[str, typer.Option(help="viewer or admin")] = "viewer",
             config: ConfigOpt = None,
             password: Annotated[str | None, typer.Option(
                 help="read from the TRIAGE_NEW_PASSWORD variable or asked for when not given",
                 envvar="TRIAGE_NEW_PASSWORD")] = None) -> None:
    """Create a user who can log in (the password is asked for twice)."""
    from storage.db import Database
    from triage.web.security import create_user

    s = _settings(config)
    pw = password or typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        with Database(s.database_url).session() as ss:
            create_user(ss, username, pw, role)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    console.print(f"user {username} ({role}) created")


@user_app.command("token")
def user_token(username: Annotated[str, typer.Argument()],
               name: Annotated[str, typer.Option(help="what the token is for")] = "api",
               config: ConfigOpt = None) -> None:
    """Create an API token for a user; it is printed once (only its hash is stored)."""
    from sqlalchemy import select

    from storage.db import Database
    from storage.models import User
    from triage.web.security import create_token

    s = _settings(config)
    with Database(s.database_url).session() as ss:
        u = ss.scalar(select(User).where(User.username == username))
        if u is None:
            raise _fail(f"no user {username!r} (create it with `triage user add`)")
        token = create_token(ss, u, name)
    typer.echo(token)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="working folder: studies, node data, PACS, report")] = Path(
        "runs/demo"),
    cxr: Annotated[int, typer.Option(help="chest radiograph studies")] = 16,
    bct: Annotated[int, typer.Option(help="head CT studies")] = 6,
    chestct: Annotated[int, typer.Option(help="chest CT studies")] = 6,
    seed: Annotated[int, typer.Option(help="seed of the synthetic studies (the demo bundles were "
                                          "trained on seeds 1-4)")] = 2026,
    models: Annotated[Path | None, typer.Option(help="bundle folder with cxr/, bct/, chestct/ "
                                                     "(default: the demo bundles in models/)")] = None,
    pacs: Annotated[str, typer.Option(help="auto (Orthanc when installed), orthanc, or scp "
                                           "(an in-process storage SCP)")] = "auto",
    web_port: Annotated[int, typer.Option(help="status page port (0: any free port)")] = 8080,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every result")] = 240.0,
    keep_running: Annotated[bool, typer.Option(help="keep the node and its status page up "
                                                    "afterwards (Ctrl-C stops)")] = False,
) -> None:
    """The whole product on synthetic studies: PACS stand-in -> node -> ranked worklist,
    SR/SEG back in the PACS, an HTML report with overlays. Demo models, not for clinical use."""
    from triage.demo import DEFAULT_MODELS, DemoOptions, run_demo

    if pacs not in ("auto", "orthanc", "scp"):
        raise _fail("--pacs must be auto, orthanc or scp")
    opts = DemoOptions(out=out, counts={"cxr": cxr, "bct": bct, "chestct": chestct},
                       models=models or DEFAULT_MODELS, pacs=pacs, web_port=web_port, timeout=timeout,
                       keep_running=keep_running, seed=seed)
    try:
        run_demo(opts, Console())
    except (OSError, TimeoutError, RuntimeError) as exc:  # OSError: files, folders, connections
        raise _fail(str(exc)) from exc


@app.command()
def worker(config: ConfigOpt = None,
           queues: Annotated[str, typer.Option(help="comma-separated Celery queues")] = "gpu",
           concurrency: Annotated[int, typer.Option(help="worker processes")] = 1,
           loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO") -> None:
    """Run a Celery worker (Redis broker from celery.broker_url): queue gpu runs analyses,
    queue io builds the SR/SEG the GPU workers hand over."""
    import os

    if config is not None:
        os.environ["TRIAGE_CONFIG"] = str(config)  # the worker's child processes read it too
    _settings(config)
    from worker.celery_app import app as celery_app

    celery_app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-l", loglevel,
                            "-n", f"triage-{queues.replace(',', '-')}@%h", "--without-gossip",
                            "--without-mingle"])


if __name__ == "__main__":
    app()
