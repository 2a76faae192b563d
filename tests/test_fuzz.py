"""The fuzz target (tests/fuzzing.py) in CI: the seeds, a few hundred mutated inputs, the
reproducers of what the 30-minute fuzzing run found (bench/fuzz.py, docs/benchmarks.md).

Every input runs through the node's own functions in-process (the SCP's C-STORE handler,
the early finish and the quiet period with routing, ``run_job`` up to the model) on a fresh
node state; a :class:`fuzzing.Finding` (an exception other than the node's clean refusals,
an exception the node catches and logs, a non-finite model input, a slow input) fails the test.
"""

from __future__ import annotations

import io
import logging
import random
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from badinput import NO_BCT, cases, part10
from fuzzing import (
    Finding,
    Mutator,
    Outcome,
    Target,
    _put,
    elements,
    encode_element,
    pack,
    save_reproducer,
    seed_corpus,
    split,
    unpack,
)
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

import triage.analyze

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CI_SEED = 20261130
CI_INPUTS = 300


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Target() as t:
            yield t


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seed_corpus()


def _run(target: Target, data: bytes, where: Path) -> Outcome:
    try:
        return target(data)
    except Finding as f:
        path = save_reproducer(data, where, "finding")
        raise AssertionError(f"{f}\nreproducer: {path}") from f


# --------------------------------------------------------------------------- the seeds


@pytest.mark.parametrize(("name", "model"), [
    ("phantom-cxr", ("cxr/posterior", (1, 1, 64, 64))),
    ("dicomgen-cr", ("cxr/posterior", (1, 1, 64, 64))),
    ("dicomgen-dx", ("cxr/posterior", (1, 1, 64, 64))),
    ("phantom-head-ct", ("bct/patch map", None)),
    ("phantom-chest-ct", ("chestct/patch map", None)),
    ("dicomgen-chest-ct", ("chestct/patch map", None)),
])
def test_valid_seeds_reach_the_model(target: Target, seeds: dict[str, bytes], name: str,
                                     model: tuple[str, tuple[int, ...] | None], tmp_path: Path) -> None:
    out = _run(target, seeds[name], tmp_path)
    assert set(out.statuses) == {"0x0000"}, out
    assert len(out.model_inputs) == 1, out
    kind, shape = out.model_inputs[0]
    assert kind == model[0], out
    if model[1] is not None:
        assert shape == model[1], out
    else:
        assert len(shape) == 3 and min(shape) >= 1, out


def test_bad_input_corpus_gets_its_documented_outcome_in_process(target: Target, tmp_path: Path) -> None:
    """The target answers every bad-input case (docs/bad-input.md) as the real node does over
    the network: the same statuses, the same routing and, where the case names one, the same
    job outcome (this node has a head-CT bundle: those jobs reach the model instead)."""
    wrong = []
    for c in cases():
        if c.negotiation == "association-rejected":  # AE titles: the association, not the target
            continue
        out = _run(target, pack([s.data for s in c.sends]), tmp_path / c.id)
        expected = ["context-rejected" if s.status is None else f"0x{s.status:04X}" for s in c.sends]
        problems = []
        if out.statuses != expected:
            problems.append(f"statuses {out.statuses} != {expected}")
        for s, comment in zip(c.sends, out.comments, strict=False):
            if s.comment and s.comment not in " ".join(out.comments):
                problems.append(f"no comment {s.comment!r} in {out.comments} ({comment!r})")
        if c.route is not None:
            routes = [r for r in out.routes if r.startswith(c.route + " ") and c.route_reason in r]
            if not routes:
                problems.append(f"routes {out.routes} lack {c.route} ({c.route_reason!r})")
        if c.job == "done" and not any(j.startswith("model ") for j in out.jobs):
            problems.append(f"jobs {out.jobs}: the model is not reached")
        if c.job == "failed" and c.job_reason != NO_BCT and not any(c.job_reason in j for j in out.jobs):
            problems.append(f"jobs {out.jobs} lack {c.job_reason!r}")
        if problems:
            wrong.append(f"{c.id}: {'; '.join(problems)}")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- mutations


def test_mutated_inputs_raise_no_finding(target: Target, seeds: dict[str, bytes], tmp_path: Path) -> None:
    """A deterministic slice of the fuzzing run: the seeds' mutations through the target."""
    rng = random.Random(CI_SEED)
    mutator = Mutator()
    names = sorted(n for n, d in seeds.items() if len(d) < 64 * 1024)
    outcomes: set[str] = set()
    reached = 0
    for i in range(CI_INPUTS):
        data = mutator(seeds[rng.choice(names)], rng)
        out = _run(target, data, tmp_path / f"input-{i}")
        outcomes.add(out.signature())
        reached += out.reached_model
    assert not mutator.errors, mutator.errors[:5]
    assert len(outcomes) >= 40, sorted(outcomes)  # the mutations reach many different outcomes
    assert reached >= 10, reached  # and some still reach the model


def test_unpack_never_raises_and_inverts_pack() -> None:
    files = [b"a", b"", b"\x00" * 300]
    assert unpack(pack(files)) == files
    assert unpack(b"not packed") == [b"not packed"]
    assert unpack(pack(files)[:-5])[-1] == b"\x00" * 295  # a cut input keeps what is there


def test_a_crash_the_node_only_logs_is_a_finding(target: Target, seeds: dict[str, bytes],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """run_job re-queues a job after an unexpected exception and logs it: the target reports it."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(triage.analyze, "read_series", broken)
    root, worker = logging.getLogger(), logging.getLogger("worker")
    levels = root.level, worker.level
    root.setLevel(logging.CRITICAL)  # as bench/fuzz.py keeps the console quiet
    worker.setLevel(logging.NOTSET)
    try:
        with pytest.raises(Finding, match="logged-exception: KeyError") as info:
            target(seeds["dicomgen-cr"])
    finally:
        root.setLevel(levels[0])
        worker.setLevel(levels[1])
    assert info.value.kind == "logged-exception"


def test_a_non_finite_model_input_is_a_finding(target: Target, seeds: dict[str, bytes],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Were preprocessing to let a NaN through (it refuses them today), the target reports it."""
    real = triage.analyze.read_series

    def with_nan(*args: Any, **kwargs: Any) -> Any:
        s = real(*args, **kwargs)
        s.array[0, 0] = np.nan
        return s

    monkeypatch.setattr(triage.analyze, "read_series", with_nan)
    monkeypatch.setattr("flows.preprocess.Preprocessing.apply_with_boxes",
                        lambda self, images: (np.asarray(images, dtype=np.float32)[:, None],
                                              [tuple(slice(0, n) for n in im.shape) for im in images]))
    with pytest.raises(Finding, match="1 non-finite value") as info:
        target(seeds["phantom-cxr"])  # 64 x 64: the bundle's shape
    assert info.value.kind == "model-input"


# --------------------------------------------------------------------------- reproducers
# What the fuzzing run found (docs/benchmarks.md, "Fuzzing (issue 8C)"), rebuilt from a valid
# phantom radiograph; each was a crash before its fix and now gets a clean outcome.


def _cxr(seeds: dict[str, bytes]) -> bytes:
    return unpack(seeds["phantom-cxr"])[0]


def _with_element(data: bytes, tag: int, vr: str, value: bytes) -> bytes:
    """``data`` with the element ``tag`` (re)encoded in explicit VR little endian as given."""
    f = split(data)
    assert f is not None and f.transfer_syntax == "1.2.840.10008.1.2.1"
    new = encode_element(tag, vr, value, implicit=False, little=True)
    return _put(data, elements(data, f), tag, new, f.start)


def _rle_run_past_the_segment(seeds: dict[str, bytes]) -> bytes:
    """RLE Lossless whose second segment's last run writes past the segment's end: the Rust
    decoder of pylibjpeg-rle panicked (pyo3 PanicException, a BaseException) and the panic went
    through ``except Exception`` in triage/imaging.py and in run_job."""
    def literal(n: int) -> bytes:
        out = b""
        while n > 0:
            k = min(128, n)
            out += bytes([k - 1]) + b"\x01" * k
            n -= k
        return out

    seg0, seg1 = literal(64 * 64), literal(64 * 64 - 6) + bytes([257 - 10, 7])  # a run of 10 at 6 left
    frame = struct.pack("<16I", 2, 64, 64 + len(seg0), *[0] * 13) + seg0 + seg1
    ds = pydicom.dcmread(io.BytesIO(_cxr(seeds)))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return part10(ds, RLELossless)


def _last_element_unknown_vr(seeds: dict[str, bytes]) -> bytes:
    """No pixel data; the last element has an unknown VR and no value: the completeness check
    of triage/ingest.py read it with ``get_item``, which converts an element without a value."""
    data = _cxr(seeds)
    f = split(data)
    assert f is not None
    pix = next(e for e in elements(data, f) if e.tag == 0x7FE00010)
    return data[:pix.start] + encode_element(0x54041053, "Q\x00", b"", implicit=False, little=True)


def _sequence_with_unknown_vr() -> bytes:
    """One sequence item holding an element of an unknown VR ('MA')."""
    inner = encode_element(0x00100010, "MA", b"ab", implicit=False, little=True)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner


REPRODUCERS: list[tuple[str, Callable[[dict[str, bytes]], bytes], str, str]] = [
    # (id, the input, the status, a substring of the job's outcome or of the Error Comment)
    ("rle-run-past-segment", _rle_run_past_the_segment, "0x0000", "cannot decode pixel data"),
    ("last-element-unknown-vr", _last_element_unknown_vr, "0xA900", "image SOP class without pixel data"),
    # a value whose length its VR cannot hold: pydicom raises BytesLengthException when the
    # value is first read, which was inside the header checks (triage/ingest.py) ...
    ("columns-ul-2-bytes", lambda s: _with_element(_cxr(s), 0x00280011, "UL", b"\x40\x00"), "0xA900",
     "invalid image size 64 x None"),
    ("bits-allocated-fd-2-bytes", lambda s: _with_element(_cxr(s), 0x00280100, "FD", b"\x10\x00"),
     "0xA900", "BitsAllocated None"),
    ("sop-instance-uid-uv", lambda s: _with_element(_cxr(s), 0x00080018, "UV", b"2.25.4170956984912"),
     "0xC002", "malformed SOPInstanceUID (cannot be read"),
    ("photometric-sv", lambda s: _with_element(_cxr(s), 0x00280004, "SV", b"MONOCHROME2 "), "0x0000",
     "unreadable DICOM file (BytesLengthException"),
    # ... or an unknown VR (NotImplementedError) in a routing attribute or in Rows
    ("body-part-unknown-vr", lambda s: _with_element(_cxr(s), 0x00180015, "CR", b"CHEST "), "0x0000",
     "unreadable DICOM file (NotImplementedError"),
    ("rows-unknown-vr", lambda s: _with_element(_cxr(s), 0x00280010, "ES", b"\x40\x00"), "0xA900",
     "invalid image size None x 64"),
    # ... or inside the imaging code (triage/imaging.py reads Window Width for the result's
    # details): run_job caught it as a crash and re-queued the job up to max_attempts
    ("window-width-ul-2-bytes", lambda s: _with_element(_cxr(s), 0x00281051, "UL", b"80"), "0x0000",
     "unreadable DICOM file (BytesLengthException"),
    # a code string of another VR is one number: triage/imaging.py iterated over it (TypeError,
    # found by the 30-minute run: run_job re-queued the job; the image is analysed now)
    ("patient-orientation-sl", lambda s: _with_element(_cxr(s), 0x00200020, "SL", struct.pack("<i", 17)),
     "0x0000", "model cxr/posterior"),
    ("image-type-us", lambda s: _with_element(_cxr(s), 0x00080008, "US", struct.pack("<H", 1)), "0x0000",
     "model cxr/posterior"),
    # a sequence where a value belongs, its item holding an unknown VR: str() of the sequence
    # converts the item's elements (the second 30-minute run: a routing attribute for the index);
    # the same in a UID and in a name
    ("body-part-sequence", lambda s: _with_element(_cxr(s), 0x00180015, "SQ", _sequence_with_unknown_vr()),
     "0x0000", "unreadable DICOM file (NotImplementedError"),
    ("sop-instance-uid-sequence",
     lambda s: _with_element(_cxr(s), 0x00080018, "SQ", _sequence_with_unknown_vr()), "0xC002",
     "malformed SOPInstanceUID (cannot be read"),
    ("patient-name-sequence", lambda s: _with_element(_cxr(s), 0x00100010, "SQ", _sequence_with_unknown_vr()),
     "0x0000", "unreadable DICOM file (NotImplementedError"),
]


@pytest.mark.parametrize(("make", "status", "outcome"),
                         [pytest.param(m, s, o, id=i) for i, m, s, o in REPRODUCERS])
def test_fuzz_finding_reproducer_gets_a_clean_outcome(target: Target, seeds: dict[str, bytes], make: Any,
                                                      status: str, outcome: str, tmp_path: Path) -> None:
    out = _run(target, make(seeds), tmp_path)
    assert out.statuses == [status], out
    assert outcome in " ".join(out.comments + out.jobs), out
