"""Peak memory of ``triage train`` for a CT patch bundle, against the number of training CTs.

    .venv/bin/python bench/ctmemory.py [--n 16,64] [--val 6] [--preset tiny-chestct] [--mm 2]

Writes chest-CT phantoms (``flows.phantoms.chestct``, a 256 x 288 x 384 mm body) at ``--mm``
spacing as NIfTI files (``triage synth --format nifti``): for each N in ``--n``, N normal
and N mixture volumes (half abnormal) in two folders, and one labelled validation folder of
``--val`` volumes with a labels.csv. Then, per N, in a subprocess, the command a user runs:
``triage train --preset P --normal DIR --mixture DIR --validation DIR --noise-floor 95`` (one
epoch each, as the memory, not the model, is measured). One JSON line per N to stdout and
runs/ctmemory.jsonl: the child's peak RSS (``getrusage``), the seconds, and the raw HU bytes of
the N + N training volumes (what holding the set in memory would cost on top).

The preset only sets the model grid and size; ``tiny-chestct`` (8 mm) keeps a run short.
``--src DIR`` runs the CLI of another checkout (e.g. ``git worktree add /tmp/old REV``) in
place of the installed one, to compare revisions on the same files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from flows.phantoms.chestct import make_chestct  # noqa: E402
from triage.phantom_files import write_image_files  # noqa: E402

TRIAGE = str(Path(sys.executable).with_name("triage"))
# the CLI of the checkout in argv[1]: drop the editable install's finder, which would win
FROM_SRC = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
            "getattr(f, '__module__', '').startswith('__editable__')]; "
            "sys.path.insert(0, sys.argv.pop(1)); from triage.cli import app; app()")
BODY_MM = (256, 288, 384)  # the phantom generator's default field at 4 mm: 64 x 72 x 96


def write_nifti(out: Path, n: int, abnormal: float, seed: int, mm: float, labels: bool) -> None:
    """``n`` phantoms as NIfTI files under ``out`` (triage.phantom_files); without ``labels``
    the volumes alone, as a site's training folder holds them."""
    shape = tuple(round(s / mm) for s in BODY_MM)
    ps = make_chestct(n, shape=shape, spacing_mm=mm, abnormal_fraction=abnormal, seed=seed)  # type: ignore[arg-type]
    part = out.with_name(out.name + ".part")  # renamed when complete: a rerun reuses it
    write_image_files(ps, part, "nifti", labelled=labels)
    part.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="16,64", help="training volumes per folder, comma-separated")
    ap.add_argument("--val", type=int, default=6)
    ap.add_argument("--preset", default="tiny-chestct")
    ap.add_argument("--mm", type=float, default=2.0, help="voxel size of the written CTs")
    ap.add_argument("--work", type=Path, default=Path("runs/ctmemory"))
    ap.add_argument("--src", type=Path, help="run the CLI of this checkout instead")
    args = ap.parse_args()
    work = args.work
    val = work / "val"
    if not val.exists():
        # alternate labels so a small set holds both classes
        write_nifti(val, args.val, 0.5, 3, args.mm, labels=True)
    for n in (int(x) for x in args.n.split(",")):
        dirs = {}
        nbytes = 0
        for name, ab, seed in (("normal", 0.0, 1), ("mixture", 0.5, 2)):
            d = work / f"{name}{n}"
            if not d.exists():
                write_nifti(d, n, ab, seed, args.mm, labels=False)
            nbytes += sum(np.prod(nib.load(p).shape) * 4 for p in d.glob("*.nii.gz"))
            dirs[name] = d
        out = work / f"bundle{n}"
        t0 = time.time()
        # a fresh parent per run, so getrusage's peak over children is this run's alone
        cli = [sys.executable, "-c", FROM_SRC, str(args.src)] if args.src else [TRIAGE]
        cmd = [*cli, "train", "--preset", args.preset, "--normal", str(dirs["normal"]),
               "--mixture", str(dirs["mixture"]), "--validation", str(val), "--out", str(out),
               "--noise-floor", "95", "--epochs", "1", "--finetune-epochs", "1"]
        probe = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
                 "print(json.dumps([p.returncode, "
                 "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
        proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
        rc, peak = json.loads(proc.stdout.strip().splitlines()[-1])
        if rc:
            sys.exit(f"triage train failed ({rc}):\n{proc.stdout}\n{proc.stderr}")
        row = {"n": n, "val": args.val, "src": str(args.src or "installed"),
               "preset": args.preset, "mm": args.mm,
               "peak_rss_mb": round(peak / 1024, 1),
               "training_hu_mb": round(float(nbytes) / 2**20, 1),
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        Path("runs").mkdir(exist_ok=True)
        with Path("runs/ctmemory.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
