"""`triage demo` end to end with small bundles: studies over DICOM, results back in the PACS."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from flows.bundle import Bundle
from triage.demo import DemoOptions, concordance, fresh_workdir, run_demo


def _models(tmp_path: Path, **bundles: Bundle) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for kind, b in bundles.items():
        (d / kind).symlink_to(b.path)
    return d


@pytest.mark.parametrize("pacs", ["scp", "orthanc"])
def test_demo_end_to_end(tmp_path: Path, tiny_bundle: Bundle, ct_bundle: Bundle, pacs: str) -> None:
    if pacs == "orthanc":
        from nodekit import require_tool

        require_tool("Orthanc", "orthanc")
    counts = {"cxr": 4, "chestct": 2} if pacs == "scp" else {"cxr": 2}
    console = Console(record=True, width=120)
    out = run_demo(DemoOptions(out=tmp_path / "demo", counts=counts, pacs=pacs, web_port=0, timeout=180,
                               models=_models(tmp_path, cxr=tiny_bundle, chestct=ct_bundle)), console)
    n = sum(counts.values())
    assert out.pacs == pacs and len(out.rows) == n and [r["rank"] for r in out.rows] == list(range(1, n + 1))
    assert {r["kind"] for r in out.rows} == set(counts) and all(r["state"] == "analysed" for r in out.rows)
    # every series' SR and SEG reached the PACS stand-in
    assert out.outputs.get("SR", 0) == n and out.outputs.get("SEG", 0) >= n
    html = out.report.read_text()
    assert html.count('alt="overlay"') == n and "not for clinical use" in html
    text = console.export_text()
    assert "worklist in reading order" in text and "abnormal read before normal" in text
    # (a kind whose few studies are all normal or all abnormal has no pairs to order)
    assert "all" in out.concordance and set(out.concordance) <= {*counts, "all"}


def test_concordance_is_the_auroc_of_the_reading_order() -> None:
    def row(rank: int, kind: str, label: int, pct: float | None) -> dict[str, object]:
        return {"rank": rank, "kind": kind, "label": label, "priority": 4, "percentile": pct}

    rows = [row(1, "cxr", 1, 90.0), row(2, "cxr", 0, 80.0), row(3, "cxr", 1, 70.0),
            row(4, "bct", 0, 60.0), row(5, "bct", 1, 50.0)]
    c = concordance(rows)
    assert c["cxr"] == 0.5 and c["bct"] == 0.0 and c["all"] == pytest.approx(3 / 6)
    # same priority and percentile: read in arrival order, a tie, not a win
    tied = [row(1, "chestct", 1, 85.7), row(2, "chestct", 0, 85.7), row(3, "chestct", 0, 40.0)]
    assert concordance(tied)["chestct"] == pytest.approx((0.5 + 1.0) / 2)


def test_a_rerun_analyses_afresh_and_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (out / "node").mkdir(parents=True)
    (out / "node" / "triage.db").write_text("an earlier run's results")
    (out / "studies" / "cxr-normal").mkdir(parents=True)
    (out / "studies" / "cxr-normal" / "labels.csv").write_text("case,label\n")
    (out / "mine.txt").write_text("not the demo's")
    fresh_workdir(out)  # an earlier demo's folder (from before the marker): its own entries go
    assert not (out / "node").exists() and not (out / "studies").exists()
    assert (out / "mine.txt").is_file() and (out / ".triage-demo").is_file()
    fresh_workdir(out)  # marked now
    # a folder that merely has "studies" and "node" (someone's home, say) is not the demo's
    foreign = tmp_path / "home"
    (foreign / "studies" / "2024").mkdir(parents=True)
    (foreign / "studies" / "2024" / "ct.dcm").write_bytes(b"precious")
    (foreign / "node").mkdir()
    (foreign / "report").mkdir()
    with pytest.raises(FileExistsError, match="not a triage demo folder"):
        fresh_workdir(foreign)
    assert (foreign / "studies" / "2024" / "ct.dcm").read_bytes() == b"precious"
    assert (foreign / "node").is_dir() and (foreign / "report").is_dir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        fresh_workdir(tmp_path / "a-file")
    # a marker that is a link is replaced, not written through
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".triage-demo").symlink_to(victim)
    fresh_workdir(linked)
    assert victim.read_text() == "keep" and not (linked / ".triage-demo").is_symlink()


def test_demo_without_bundles_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-demo-models"):
        run_demo(DemoOptions(out=tmp_path / "d", models=tmp_path / "none", web_port=0), Console())
