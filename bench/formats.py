"""Does the file format a site exports its radiographs in change what the node learns?

    NT=2 .venv/bin/python bench/formats.py TAG '{"n": 300, "source": "alt", "size": 256}'

Writes one set of phantom radiographs (normal seed 11, mixture seed 12 half abnormal, test
seed 13 half abnormal; ``source`` ``ours`` or ``alt``: bench/altcxr.py) in each format of
``formats`` (default ``npz`` float32, ``png16``, ``png8``, ``jpeg`` 8-bit at ``quality`` 90):
training sets as folders of files, the test set as a folder with a labels.csv naming each
file and its lesion mask (an .npz of images, labels and masks for ``npz``). Then, for each
format, the CLI a user runs: ``triage train --preset cpu-cxr`` from the folders and
``triage evaluate`` on the test folder, in subprocesses. One JSON line per format to stdout
and runs/formats.jsonl: the posterior's AUROC with its 95 % CI, the pointing-game rate, the
seconds. Set NT to the number of torch threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.altcxr import make_alt_cxr  # noqa: E402
from flows.phantoms import PhantomSet, make_cxr  # noqa: E402
from triage.phantom_files import write_image_files  # noqa: E402

FORMATS = ("npz", "png16", "png8", "jpeg")
TRIAGE = str(Path(sys.executable).with_name("triage"))


def write(ps: PhantomSet, folder: Path, fmt: str, *, labelled: bool, quality: int) -> Path:
    """``ps`` in ``fmt`` under ``folder``; returns what the CLI is given. Training folders hold
    the pictures alone; the test folder also their masks and a labels.csv
    (triage.phantom_files)."""
    if fmt == "npz":
        out = folder.with_suffix(".npz")
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": ps.images[:, 0]}
        if labelled:
            arrays.update(labels=ps.labels, findings=np.asarray(ps.findings), masks=ps.masks[:, 0])
        np.savez(out, **arrays)  # type: ignore[arg-type]
        return out
    return write_image_files(ps, folder, "png" if fmt == "png16" else fmt, quality=quality,
                             labelled=labelled)


def main() -> None:
    tag = sys.argv[1]
    cfg = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    n, nt, size = int(cfg.get("n", 300)), int(cfg.get("nt", 600)), int(cfg.get("size", 256))
    make = make_alt_cxr if cfg.get("source", "alt") == "alt" else make_cxr
    sets = {"normal": make(n, size=size, seed=11),
            "mixture": make(n, size=size, abnormal_fraction=0.5, seed=12),
            "test": make(nt, size=size, abnormal_fraction=0.5, seed=13)}
    root = Path("runs/formats") / tag
    for fmt in cfg.get("formats", FORMATS):
        t0 = time.perf_counter()
        where = {k: write(ps, root / fmt / k, fmt, labelled=k == "test", quality=int(cfg.get("quality", 90)))
                 for k, ps in sets.items()}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("NT", "2")}
        subprocess.run([TRIAGE, "train", "--preset", "cpu-cxr", "--normal", str(where["normal"]),
                        "--mixture", str(where["mixture"]), "--out", str(root / fmt / "bundle"),
                        "--seed", str(cfg.get("seed", 0))], check=True, env=env)
        subprocess.run([TRIAGE, "evaluate", "--bundle", str(root / fmt / "bundle"), "--data",
                        str(where["test"]), "--out", str(root / fmt / "eval")], check=True, env=env)
        summary = json.loads((root / fmt / "eval" / "summary.json").read_text())
        post = summary["scores"]["posterior"]["overall"]
        loc_path = root / fmt / "eval" / "localisation.json"
        loc = json.loads(loc_path.read_text()) if loc_path.exists() else {}
        row = {"tag": tag, "format": fmt, **cfg, "posterior_auc": round(post["auc"], 4),
               "ci": [round(post["lo"], 4), round(post["hi"], 4)],
               "pointing": {f: round(v.get("pointing", float("nan")), 3)
                            for f, v in loc.get("findings", {}).items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        with open("runs/formats.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
