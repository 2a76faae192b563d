"""The bad-input corpus: malformed and edge-case DICOM, each with the outcome the node must give.

Every case starts from a valid instance written by the product's phantom writer
(:func:`triage.phantom_dicom.write_dicom_studies`: a DX chest radiograph, an axial head CT,
an axial chest CT), breaks one thing, and says what must happen at each stage that applies:

* **negotiation**: ``accepted``, ``context-rejected`` (no presentation context for what the
  sender proposed) or ``association-rejected``;
* **C-STORE status** of each instance (``0x0000``, ``0xA900``, ``0xC001``, ...), with a
  substring of the Error Comment;
* **routing** of the stored series: a kind (``cxr``, ``bct``, ``chestct``) or ``ignore``, with
  a substring of the reason;
* **the job**: ``done`` or ``failed`` with a substring of the reason.

Delivery: a :class:`Send` holds the bytes of a Part 10 file. ``raw`` sends put the data set
on the wire exactly as those bytes hold it (pynetdicom's chunked mode reads the file after
its meta information and never re-encodes it), which is the only way to send byte-level
damage (truncation, lying lengths, bytes in the wrong character set); ``dataset`` sends
decode the file and let pynetdicom encode it in the negotiated transfer syntax, as most
senders do. The head CT phantom is routed to ``bct``; where no bct bundle is configured,
``failed: no model bundle configured for 'bct'`` is the outcome that proves the series was
read into a volume (the series is read before the bundle is looked up).

``docs/bad-input.md`` lists every case with why its outcome is the right one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import socket
import tempfile
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from dicomgen import lenient_values as lenient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triage.phantom_dicom import write_dicom_studies

__all__ = ["CASES_DOC", "Case", "Delivered", "Send", "cases", "deliver", "deliver_all", "uid"]

CASES_DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
JPEG_XL = "1.2.840.10008.1.2.4.112"
DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.99999.1"

OK = 0x0000
DOES_NOT_MATCH = 0xA900
CANNOT_PARSE = 0xC001
BAD_UID = 0xC002
TOO_LARGE = 0xC003

NO_BCT = "no model bundle configured for 'bct'"
BCT_RULE = "head CT, axial, 2.5-7 mm"
CHEST_RULE = "chest CT, axial, <= 3 mm"

_NS = uuid.UUID("0b7e4c6a-8f7d-4a51-bd0e-5c2f9a1d3e77")


def uid(*parts: object) -> str:
    """A deterministic, valid ``2.25.`` UID named by ``parts``."""
    return f"2.25.{uuid.uuid5(_NS, '/'.join(str(p) for p in parts)).int}"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Send:
    """One C-STORE: a Part 10 file, and the status it must get (None: never sent, because
    negotiation gave it no presentation context)."""

    data: bytes
    status: int | None = OK
    comment: str = ""  # a substring of the Error Comment
    mode: str = "raw"  # "raw": the file's data set bytes as they are; "dataset": re-encoded

    @functools.cached_property
    def meta(self) -> Dataset:
        return _meta(self.data)

    @property
    def sop_class(self) -> str:
        return str(self.meta.MediaStorageSOPClassUID)

    @property
    def sop_instance(self) -> str:
        return str(self.meta.MediaStorageSOPInstanceUID)

    @property
    def transfer_syntax(self) -> str:
        return str(self.meta.TransferSyntaxUID)


@dataclass(frozen=True)
class Case:
    id: str
    description: str  # what is wrong (one line)
    why: str  # why the expected outcome is the right one (one line)
    sends: tuple[Send, ...]
    series_uid: str | None = None  # the series whose routing and job are checked
    route: str | None = None  # cxr | bct | chestct | ignore; None: nothing is stored
    route_reason: str = ""
    job: str | None = None  # done | failed; None: no job
    job_reason: str = ""
    negotiation: str = "accepted"  # | context-rejected | association-rejected
    # presentation contexts to propose instead of one per (SOP class, transfer syntax) sent
    propose: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rejected: tuple[str, ...] = ()  # transfer syntaxes whose proposal must be refused
    called_ae: str = "TRIAGE"
    xfail: str | None = None  # a known product bug (strict xfail)

    def outcome(self) -> str:
        """The expected outcome in words (what docs/bad-input.md shows)."""
        if self.negotiation != "accepted":
            return self.negotiation
        statuses = sorted({s.status for s in self.sends if s.status is not None})
        parts = ["/".join(f"0x{s:04X}" for s in statuses)]
        comments = [s.comment for s in self.sends if s.comment]
        if comments:
            parts[0] += f" ({comments[0]!r})"
        if self.route is not None:
            parts.append(self.route + (f" ({self.route_reason!r})" if self.route_reason else ""))
        if self.job is not None:
            parts.append(self.job + (f" ({self.job_reason!r})" if self.job_reason else ""))
        return " → ".join(parts)


@dataclass
class Delivered:
    """What the node answered to a case's sends."""

    negotiation: str
    statuses: list[tuple[int | None, str]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # transfer syntaxes refused at negotiation


# --------------------------------------------------------------------------- encoding


def _meta(data: bytes) -> Dataset:
    fp = io.BytesIO(data)
    fp.seek(128)
    assert fp.read(4) == b"DICM", "not a Part 10 file"
    return pydicom.filereader._read_file_meta_info(fp)


def _meta_bytes(sop_class: str, sop_instance: str, ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with lenient():
        write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def body(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    """The data set alone, encoded in ``ts`` (its compressed pixel data already encapsulated)."""
    t = UID(ts)
    ds = copy.copy(ds)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    fp = io.BytesIO()
    with lenient():
        pydicom.dcmwrite(fp, ds, implicit_vr=t.is_implicit_VR, little_endian=t.is_little_endian)
    return fp.getvalue()


def part10(ds: Dataset, ts: str = ExplicitVRLittleEndian, *, meta_ts: str | None = None,
           sop_class: str | None = None, sop_instance: str | None = None) -> bytes:
    """``ds`` as a Part 10 file; the meta information may claim another transfer syntax, SOP
    class or instance than the data set holds (the sender then proposes and announces those)."""
    return _meta_bytes(sop_class or str(ds.SOPClassUID), sop_instance or str(ds.SOPInstanceUID),
                       meta_ts or ts) + body(ds, ts)


def with_body(data: bytes, new_body: bytes) -> bytes:
    """``data``'s meta information followed by ``new_body``."""
    return data[:_body_start(data)] + new_body


def _body_start(data: bytes) -> int:
    return 144 + int.from_bytes(data[140:144], "little")


# --------------------------------------------------------------------------- valid bases


@dataclass
class _Phantoms:
    """What :func:`write_dicom_studies` needs of a phantom set."""

    images: np.ndarray
    spacing: tuple[float, ...]
    meta: dict[str, Any]
    labels: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    findings: list[str] = field(default_factory=lambda: ["none"])
    zero_fraction: np.ndarray = field(default_factory=lambda: np.zeros(1))


def _head(d: int, h: int, w: int) -> np.ndarray:
    """Hounsfield units of a crude head: air, a skull ring, brain."""
    z, y, x = np.mgrid[0:d, 0:h, 0:w].astype(np.float64)
    r = np.hypot((y - (h - 1) / 2) / (h / 2), (x - (w - 1) / 2) / (w / 2))
    vol = np.full((d, h, w), -1000.0)
    vol[r < 0.9] = 1000.0
    vol[r < 0.75] = 35.0 + 5.0 * np.sin(z[r < 0.75])
    return vol


@functools.cache
def _files(kind: str) -> tuple[bytes, ...]:
    """Part 10 bytes of one valid phantom study of ``kind`` from the product's writer."""
    rng = np.random.default_rng(11)
    if kind == "cxr":
        yy, xx = np.mgrid[0:64, 0:64] / 63.0
        img = 0.3 + 0.4 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) * 6) + rng.normal(0, 0.02, (64, 64))
        ps = _Phantoms(np.clip(img, 0, 1)[None, None], (2.0, 2.0), {"kind": "cxr"})
    elif kind == "head":  # 12 axial slices, 5 mm: the head-CT rule (>= 10 slices, 2.5-7 mm)
        ps = _Phantoms(_head(12, 16, 16)[None, None], (5.0, 8.0, 8.0), {"kind": "bct"})
    elif kind == "chest":  # 24 axial slices, 2 mm: the chest-CT rule (>= 20 slices, <= 3 mm)
        vol = _head(24, 16, 16) - 800.0
        ps = _Phantoms(vol[None, None], (2.0, 8.0, 8.0), {"kind": "chestct"})
    else:
        raise ValueError(kind)
    with tempfile.TemporaryDirectory() as tmp:
        write_dicom_studies(ps, Path(tmp) / "out", seed=29)
        return tuple(p.read_bytes() for p in sorted((Path(tmp) / "out").rglob("*.dcm")))


def base(kind: str, case: str) -> list[Dataset]:
    """Fresh copies of a valid ``kind`` study with the case's own UIDs (slices in order)."""
    out: list[Dataset] = []
    for k, data in enumerate(_files(kind)):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID = uid(case, "study")
        ds.SeriesInstanceUID = uid(case, "series")
        ds.SOPInstanceUID = uid(case, "instance", k)
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = uid(case, "frame")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _sends(dss: list[Dataset], ts: str = ExplicitVRLittleEndian, mode: str = "raw",
           status: int | None = OK, comment: str = "") -> tuple[Send, ...]:
    return tuple(Send(part10(ds, ts), status=status, comment=comment, mode=mode) for ds in dss)


def _pixels(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<i2" if ds.PixelRepresentation else "<u2").reshape(
        int(ds.Rows), int(ds.Columns))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


# --------------------------------------------------------------------------- the cases


def _negotiation(out: list[Case]) -> None:
    dss = base("head", "deflate-only")
    out.append(Case(
        "deflate-only", "head CT proposed only in Deflated Explicit VR Little Endian",
        "a few MB of deflated zeros inflate to gigabytes before any size could be checked; senders "
        "that offer Deflate also offer an uncompressed syntax",
        (Send(part10(dss[0], meta_ts=DeflatedExplicitVRLittleEndian), status=None),),
        negotiation="context-rejected", rejected=(DeflatedExplicitVRLittleEndian,)))
    dss = base("head", "deflate-or-explicit")
    out.append(Case(
        "deflate-or-explicit", "head CT proposed in Deflate and in Explicit VR Little Endian",
        "the Deflate proposal is refused, the uncompressed one accepted: the series arrives and is read",
        _sends(dss, mode="dataset"), series_uid=dss[0].SeriesInstanceUID, route="bct",
        route_reason=BCT_RULE, job="failed", job_reason=NO_BCT,
        propose=((CT, (DeflatedExplicitVRLittleEndian,)), (CT, (ExplicitVRLittleEndian,))),
        rejected=(DeflatedExplicitVRLittleEndian,)))
    dss = base("head", "jpip-referenced-deflate")
    out.append(Case(
        "jpip-referenced-deflate", "head CT proposed only in JPIP Referenced Deflate",
        "a deflated syntax that pydicom does not flag as deflated; refused like Deflate",
        (Send(part10(dss[0], meta_ts=JPIP_REFERENCED_DEFLATE), status=None),),
        negotiation="context-rejected", rejected=(JPIP_REFERENCED_DEFLATE,)))
    ds = base("head", "unknown-sop-class")[0]
    out.append(Case(
        "unknown-sop-class", "a private, unknown SOP class",
        "the node cannot know what the object is; the abstract syntax is refused at negotiation",
        (Send(part10(ds, sop_class=PRIVATE_SOP_CLASS), status=None),), negotiation="context-rejected"))
    ds = base("cxr", "wrong-called-ae")[0]
    out.append(Case(
        "wrong-called-ae", "the association is addressed to another AE title",
        "require_called_ae: a misconfigured sender is told at once rather than storing to the wrong node",
        (Send(part10(ds), status=None),), negotiation="association-rejected", called_ae="NOTTRIAGE"))


def _parse(out: list[Case]) -> None:
    ds = base("cxr", "not-dicom")[0]
    data = part10(ds)
    rng = np.random.default_rng(1)
    out.append(Case(
        "not-dicom", "valid file meta, then 4 kB of random bytes as the data set",
        "nothing can be indexed; 0xC001 is 'cannot understand'",
        (Send(with_body(data, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()), CANNOT_PARSE),)))
    ds = base("cxr", "empty-dataset")[0]
    out.append(Case(
        "empty-dataset", "a C-STORE whose data set has no element at all",
        "no UIDs to index it by",
        (Send(with_body(part10(ds), b""), BAD_UID, "missing SOPClassUID"),)))
    ds = base("cxr", "truncated-header")[0]
    data = part10(ds)
    start = _body_start(data)
    cut = data.index(b"PHANTOM", start) + 3  # inside the Patient Name value
    out.append(Case(
        "truncated-header", "the data set ends in the middle of Patient Name",
        "the header cannot be read completely; 0xC001",
        (Send(data[:cut], CANNOT_PARSE, "truncated"),)))
    ds = base("cxr", "truncated-element-tag")[0]
    data = part10(ds)
    cut = data.index(b"\x10\x00\x20\x00", start) + 2  # half of the Patient ID tag
    out.append(Case(
        "truncated-element-tag", "the data set ends in the middle of an element tag",
        "pydicom would end the data set quietly before the partial tag; a short header read is a "
        "truncation; 0xC001",
        (Send(data[:cut], CANNOT_PARSE, "ends inside an element"),)))
    data = part10(_sr("truncated-sr"))
    cut = data.index(b"\x40\x00\x91\xa4", start) + 3  # inside the Completion Flag tag
    out.append(Case(
        "truncated-sr", "a Basic Text SR cut inside an element tag after its UIDs",
        "a non-image object has no pixel length to betray the cut; it was acknowledged (0x0000) "
        "before the short-read check; 0xC001",
        (Send(data[:cut], CANNOT_PARSE, "ends inside an element"),)))
    ds = base("cxr", "truncated-pixel-data")[0]
    data = part10(ds)
    out.append(Case(
        "truncated-pixel-data", "the file is cut 700 bytes before the end of the pixel data",
        "an image without all its pixels cannot be analysed; 0xA900 (data set does not match the SOP class)",
        (Send(data[:-700], DOES_NOT_MATCH, "pixel data has"),)))
    ds = base("cxr", "truncated-pixel-tag")[0]
    data = part10(ds)
    pix = data.rindex(b"\xe0\x7f\x10\x00")
    out.append(Case(
        "truncated-pixel-tag", "the data set ends inside the Pixel Data element header",
        "the pixel element cannot be read; 0xC001",
        (Send(data[:pix + 6], CANNOT_PARSE, "ends inside an element"),)))
    ds = base("cxr", "implicit-as-explicit")[0]
    out.append(Case(
        "implicit-as-explicit", "the data set is Implicit VR but sent as Explicit VR Little Endian",
        "pydicom would guess the encoding, the stored file would claim the wrong one; 0xC001",
        (Send(part10(ds, ImplicitVRLittleEndian, meta_ts=ExplicitVRLittleEndian), CANNOT_PARSE,
              "not encoded in explicit VR"),)))
    ds = base("cxr", "undefined-length-native")[0]
    data = part10(ds)
    pix = data.rindex(b"\xe0\x7f\x10\x00")
    raw = bytearray(data)
    raw[pix + 8:pix + 12] = b"\xff\xff\xff\xff"
    out.append(Case(
        "undefined-length-native", "native (uncompressed) pixel data with an undefined length",
        "undefined length is only allowed for encapsulated pixel data; 0xA900",
        (Send(bytes(raw), DOES_NOT_MATCH, "undefined-length pixel data"),)))
    ds = base("cxr", "private-length-lies")[0]
    ds.add_new(0x00090010, "LO", "BADINPUT")
    ds.add_new(0x00091010, "OB", b"\x00" * 16)
    data = part10(ds)
    at = data.index(b"\x09\x00\x10\x10OB")
    raw = bytearray(data)
    raw[at + 8:at + 12] = (0x7FFFFFF0).to_bytes(4, "little")
    out.append(Case(
        "private-length-lies", "a private OB element claims 2 GB, more than the whole data set",
        "a length beyond the data set is a truncated data set; 0xC001 without allocating 2 GB",
        (Send(bytes(raw), CANNOT_PARSE),)))


def _uids(out: list[Case]) -> None:
    ds = base("cxr", "sop-uid-path")[0]
    ds.SOPInstanceUID = "1.2.3/../../../etc/passwd"
    out.append(Case(
        "sop-uid-path", "SOP Instance UID '1.2.3/../../../etc/passwd'",
        "UIDs come from the wire and must never reach a path; 0xC002",
        (Send(part10(ds), BAD_UID, "malformed"),)))
    ds = base("cxr", "study-uid-201")[0]
    ds.StudyInstanceUID = "1." * 100 + "1"
    out.append(Case(
        "study-uid-201", "a Study Instance UID of 201 characters",
        "a UID is at most 64 characters; 0xC002",
        (Send(part10(ds), BAD_UID, "malformed StudyInstanceUID (201 characters)"),)))
    ds = base("cxr", "series-uid-path")[0]
    ds.SeriesInstanceUID = "../../../../tmp/x"
    out.append(Case(
        "series-uid-path", "Series Instance UID '../../../../tmp/x'",
        "the blob store groups by series: a path character must never get there; 0xC002",
        (Send(part10(ds), BAD_UID, "malformed SeriesInstanceUID"),)))
    ds = base("cxr", "sop-uid-65")[0]
    ds.SOPInstanceUID = "1." * 32 + "1"
    out.append(Case(  # pynetdicom refuses to send it as the request's Affected SOP Instance UID
        "sop-uid-65", "a SOP Instance UID of 65 characters in the data set",
        "one character over the limit is malformed; 0xC002",
        (Send(part10(ds, sop_instance=uid("sop-uid-65", "affected")), BAD_UID,
              "malformed SOPInstanceUID (65 characters)"),)))
    ds = base("cxr", "missing-series-uid")[0]
    del ds.SeriesInstanceUID
    out.append(Case(
        "missing-series-uid", "no Series Instance UID",
        "a series cannot be assembled without its UID; 0xC002",
        (Send(part10(ds), BAD_UID, "missing SeriesInstanceUID"),)))
    ds = base("cxr", "affected-uid-mismatch")[0]
    out.append(Case(
        "affected-uid-mismatch", "the request's Affected SOP Instance UID differs from the data set's",
        "which instance is it? PS3.4 calls this a data set that does not match; 0xA900",
        (Send(part10(ds, sop_instance=uid("affected-uid-mismatch", "other")), DOES_NOT_MATCH,
              "differs from the request's"),)))
    ds = base("cxr", "sop-class-mismatch")[0]
    out.append(Case(
        "sop-class-mismatch", "a DX image sent on a CT Image Storage presentation context",
        "the data set is not of the negotiated SOP class; 0xA900",
        (Send(part10(ds, sop_class=CT), DOES_NOT_MATCH, "differs from the negotiated"),)))
    a = base("cxr", "series-in-two-studies")[0]
    b = base("cxr", "series-in-two-studies-b")[0]
    b.SeriesInstanceUID = a.SeriesInstanceUID
    out.append(Case(
        "series-in-two-studies", "a second instance reuses a stored series' UID in another study",
        "the first instance is analysed; the second would mix two studies in one series; 0xA900",
        (Send(part10(a)), Send(part10(b), DOES_NOT_MATCH, "belongs to another study")),
        series_uid=a.SeriesInstanceUID, route="cxr", job="done"))
    a = base("cxr", "instance-in-two-series")[0]
    b = base("cxr", "instance-in-two-series-b")[0]
    b.SOPInstanceUID = a.SOPInstanceUID
    b.StudyInstanceUID = a.StudyInstanceUID
    b.PatientName = "OTHER^NAME"
    out.append(Case(
        "instance-in-two-series", "a SOP Instance UID already stored in one series comes again in another",
        "an instance belongs to one series; the stored one stands; 0xA900",
        (Send(part10(a)), Send(part10(b), DOES_NOT_MATCH, "belongs to another series")),
        series_uid=a.SeriesInstanceUID, route="cxr", job="done"))


def _pixel_data(out: list[Case]) -> None:
    ds = base("cxr", "no-pixel-data")[0]
    del ds.PixelData
    out.append(Case(
        "no-pixel-data", "a DX image without Pixel Data",
        "an image SOP class without pixels does not match its SOP class; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "without pixel data"),)))
    ds = base("cxr", "pixel-data-short")[0]
    ds.Rows = 128
    out.append(Case(
        "pixel-data-short", "Rows says 128, the pixel data holds 64 rows",
        "pixel data shorter than Rows x Columns x bits is refused before decoding; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "pixel data has 8192 bytes, the header needs 16384"),)))
    ds = base("cxr", "pixel-data-empty")[0]
    ds.PixelData = b""
    out.append(Case(
        "pixel-data-empty", "Pixel Data present with length 0",
        "no pixels; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "pixel data has 0 bytes"),)))
    ds = base("cxr", "rows-zero")[0]
    ds.Rows = 0
    out.append(Case(
        "rows-zero", "Rows = 0",
        "an image of no size; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "invalid image size"),)))
    ds = base("cxr", "no-rows-columns")[0]
    del ds.Rows, ds.Columns
    out.append(Case(
        "no-rows-columns", "a DX image without Rows and Columns",
        "the pixel data cannot be interpreted; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "without Rows/Columns"),)))
    ds = base("cxr", "huge-dimensions")[0]
    ds.Rows = ds.Columns = 60000
    out.append(Case(
        "huge-dimensions", "Rows = Columns = 60000 (7 GB decoded), pixel data of a 64 x 64 image",
        "refused from the header, before any pixel is read or allocated; 0xC003",
        (Send(part10(ds), TOO_LARGE, "60000 x 60000 exceeds the limit"),)))
    ds = base("cxr", "huge-within-limits")[0]
    ds.Rows = ds.Columns = 16384
    out.append(Case(
        "huge-within-limits", "Rows = Columns = 16384 (the limit), pixel data of a 64 x 64 image",
        "within the size limit but far short of it: refused from the element header, nothing decoded",
        (Send(part10(ds), DOES_NOT_MATCH, "the header needs 536870912"),)))
    ds = base("cxr", "huge-frames")[0]
    ds.NumberOfFrames = 1_000_000
    out.append(Case(
        "huge-frames", "NumberOfFrames = 1000000",
        "beyond receive.max_frames; refused before decoding; 0xC003",
        (Send(part10(ds), TOO_LARGE, "NumberOfFrames 1000000"),)))
    ds = base("cxr", "bits-allocated-32")[0]
    ds.BitsAllocated = 32
    out.append(Case(
        "bits-allocated-32", "BitsAllocated 32 with 16-bit pixel data",
        "the pixel data is half as long as the header says; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "pixel data has"),)))
    ds = base("cxr", "bits-allocated-12")[0]
    ds.BitsAllocated = 12
    out.append(Case(
        "bits-allocated-12", "BitsAllocated 12 (must be 1 or a multiple of 8)",
        "the pixel data cannot be sized or decoded; 0xA900",
        (Send(part10(ds), DOES_NOT_MATCH, "BitsAllocated 12"),)))
    ds = base("cxr", "bits-stored-over-allocated")[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 12, 11
    out.append(Case(
        "bits-stored-over-allocated", "BitsAllocated 8 but BitsStored 12 (16-bit data: long enough)",
        "long enough to store; the pixel module contradicts itself, so the job fails with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="cannot decode pixel data"))


def _encapsulated(ds: Dataset, frames: list[bytes]) -> None:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def _syntaxes(out: list[Case]) -> None:
    dss = base("head", "big-endian-head-ct")
    for ds in dss:
        ds.PixelData = _pixels(ds).astype(">i2").tobytes()
    out.append(Case(
        "big-endian-head-ct", "a head CT in Explicit VR Big Endian (retired, still sent by old modalities)",
        "a supported syntax: stored, assembled and read into a volume (then no bct bundle)",
        _sends(dss, ExplicitVRBigEndian), series_uid=dss[0].SeriesInstanceUID, route="bct",
        route_reason=BCT_RULE, job="failed", job_reason=NO_BCT))
    ds = base("cxr", "big-endian-cxr")[0]
    ds.PixelData = _pixels(ds).astype(">u2").tobytes()
    out.append(Case(
        "big-endian-cxr", "a chest radiograph in Explicit VR Big Endian",
        "a supported syntax: analysed like any other",
        _sends([ds], ExplicitVRBigEndian), series_uid=ds.SeriesInstanceUID, route="cxr", job="done"))
    ds = base("cxr", "rle-cxr")[0]
    with lenient():
        ds.compress(RLELossless)
    out.append(Case(
        "rle-cxr", "a chest radiograph in RLE Lossless (a compressed syntax with a decoder)",
        "stored as received and decoded at analysis",
        (Send(part10(ds, RLELossless), mode="dataset"),), series_uid=ds.SeriesInstanceUID,
        route="cxr", job="done"))
    ds = base("cxr", "jpeg-xl-no-decoder")[0]
    _encapsulated(ds, [b"\xff\x0a" + bytes(254)])
    out.append(Case(
        "jpeg-xl-no-decoder", "a chest radiograph in JPEG XL (no decoder installed)",
        "accepted and stored as received (another node may decode it); the job says it cannot decode",
        (Send(part10(ds, JPEG_XL)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="cannot decode pixel data"))
    dss = base("head", "deflated-image-frames")
    for ds in dss:
        _encapsulated(ds, [zlib.compress(_pixels(ds).tobytes())])
    out.append(Case(
        "deflated-image-frames", "a head CT in Deflated Image Frame Compression (no decoder)",
        "frames are inflated only by a decoder, never at receive; the job fails with the reason",
        _sends(dss, DEFLATED_IMAGE_FRAME), series_uid=dss[0].SeriesInstanceUID, route="bct",
        route_reason=BCT_RULE, job="failed", job_reason="cannot decode pixel data"))
    ds = base("cxr", "jpeg-corrupt-fragment")[0]
    _encapsulated(ds, [b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"])
    out.append(Case(
        "jpeg-corrupt-fragment", "JPEG Baseline syntax whose only fragment is not a JPEG stream",
        "fragments are checked structurally at receive, decoded at analysis: the job fails with the reason",
        (Send(part10(ds, JPEGBaseline8Bit)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="cannot decode pixel data"))
    ds = base("cxr", "jpip-referenced")[0]
    del ds.PixelData
    ds.PixelDataProviderURL = "http://pacs.invalid/pixels/1"
    out.append(Case(
        "jpip-referenced", "JPIP Referenced: no pixel data, a Pixel Data Provider URL instead",
        "the node fetches nothing from URLs in headers; an image without pixel data; 0xA900",
        (Send(part10(ds, JPIP_REFERENCED), DOES_NOT_MATCH, "without pixel data"),)))
    ds = base("cxr", "encapsulated-no-fragment")[0]
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    out.append(Case(
        "encapsulated-no-fragment", "JPEG Baseline pixel data with a Basic Offset Table and no fragment",
        "no compressed frame at all; 0xA900",
        (Send(part10(ds, JPEGBaseline8Bit), DOES_NOT_MATCH, "holds no fragment"),)))
    ds = base("cxr", "encapsulated-no-delimiter")[0]
    _encapsulated(ds, [b"\xff\xd8" + bytes(1000) + b"\xff\xd9"])
    data = part10(ds, JPEGBaseline8Bit)
    out.append(Case(
        "encapsulated-no-delimiter", "encapsulated pixel data cut inside its fragment (no delimiter)",
        "the fragments run past the end of the data set; 0xA900",
        (Send(data[:-400], DOES_NOT_MATCH, "no sequence delimiter"),)))


def _photometric(out: list[Case]) -> None:
    ds = base("cxr", "rgb-radiograph")[0]
    grey = (_pixels(ds) >> 4).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.PixelData
    ds.PixelData = np.repeat(grey[:, :, None], 3, axis=2).tobytes()
    ds["PixelData"].VR = "OB"
    out.append(Case(
        "rgb-radiograph", "a chest radiograph stored as RGB (a screenshot of a film)",
        "routed as a radiograph, but the models take grayscale only: the job fails with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="3 samples per pixel"))
    ds = base("cxr", "palette-color-radiograph")[0]
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for c in ("Red", "Green", "Blue"):
        ds[f"{c}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            f"{c}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        setattr(ds, f"{c}PaletteColorLookupTableData", (np.arange(256, dtype="<u2") * 256).tobytes())
    out.append(Case(
        "palette-color-radiograph", "a chest radiograph with PhotometricInterpretation PALETTE COLOR",
        "indices into a colour table are not densities; the job fails with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="is not a grayscale image"))


def _multiframe(out: list[Case]) -> None:
    dss = base("head", "enhanced-ct")
    first = dss[0]
    ds = Dataset()
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
               "AccessionNumber", "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "Modality",
               "SeriesDescription", "BodyPartExamined", "FrameOfReferenceUID", "Manufacturer",
               "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
               "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, first.get(kw))
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, uid("enhanced-ct", "instance")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames = 1, len(dss)
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240101", "080000", "20240101080000"
    shared = Dataset()
    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = -1024, 1, "HU"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for s in dss:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = s.ImagePositionPatient
        item.PlanePositionSequence = DicomSequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = b"".join(s.PixelData for s in dss)
    ds["PixelData"].VR = "OW"
    out.append(Case(
        "enhanced-ct", "a head CT as one Enhanced CT Image (12 frames, geometry in functional groups)",
        "the rules take single-frame CT Image Storage only; stored and ignored with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: SOP class"))
    dss = base("head", "multiframe-ct-image")
    ds = dss[0]
    ds.NumberOfFrames = len(dss)
    ds.PixelData = b"".join(s.PixelData for s in dss)
    out.append(Case(
        "multiframe-ct-image", "a head CT as one 12-frame CT Image Storage instance (one position)",
        "one Image Position for 12 frames is no volume geometry; ignored with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: no slice geometry"))
    ds = base("cxr", "huge-enhanced-frames")[0]
    ds.NumberOfFrames = 5000
    out.append(Case(
        "huge-enhanced-frames", "a radiograph claiming 5000 frames (over receive.max_frames = 4096)",
        "refused from the header before its pixel data is looked at; 0xC003",
        (Send(part10(ds), TOO_LARGE, "NumberOfFrames 5000 outside"),)))


def _tilt(dss: list[Dataset], degrees: float) -> None:
    """Tilt the slice planes about the patient's left-right axis (a gantry tilt): positions
    still step along z, the planes are no longer perpendicular to it."""
    t = np.radians(degrees)
    for ds in dss:
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{np.cos(t):.6f}", f"{np.sin(t):.6f}"]
        ds.GantryDetectorTilt = f"{degrees:g}"


def _geometry(out: list[Case]) -> None:
    dss = base("head", "mixed-orientations")
    dss[5].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    out.append(Case(
        "mixed-orientations", "a head CT with one sagittal slice among the axial ones",
        "no single volume: never completes early, then is ignored (no slice geometry) after the quiet period",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: no slice geometry"))
    dss = base("head", "sagittal-head-ct")
    for k, ds in enumerate(dss):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [f"{-27.5 + 5 * k:g}", "-60", "60"]
    out.append(Case(
        "sagittal-head-ct", "a head CT reformatted in sagittal planes",
        "the head-CT model takes axial slices; ignored with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: not axial"))
    dss = base("head", "gantry-tilt-20")
    _tilt(dss, 20)
    out.append(Case(
        "gantry-tilt-20", "a head CT with a 20 degree gantry tilt",
        "more than 10 degrees from axial: not for the axial model; ignored with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: not axial"))
    dss = base("head", "gantry-tilt-8")
    _tilt(dss, 8)
    out.append(Case(
        "gantry-tilt-8", "a head CT with an 8 degree gantry tilt (routed as axial)",
        "the slices do not stack along their normal; resampling is the sender's job: the job says so",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="bct", route_reason=BCT_RULE,
        job="failed", job_reason="gantry tilt or shear"))
    dss = base("head", "sheared-positions")
    for k, ds in enumerate(dss):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:g}", f"{y + 2.0 * k:g}", f"{z:g}"]
    out.append(Case(
        "sheared-positions", "axial planes whose positions drift 2 mm per slice in-plane",
        "a sheared volume would be read as a straight one: the job fails with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="bct", route_reason=BCT_RULE,
        job="failed", job_reason="gantry tilt or shear"))
    dss = base("head", "duplicate-position")
    dss[6].ImagePositionPatient = dss[5].ImagePositionPatient
    out.append(Case(
        "duplicate-position", "two slices of a head CT share one Image Position (Patient)",
        "no uniform slice spacing can be measured: the series is not a volume; ignored with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: slice spacing unknown"))
    dss = base("head", "zero-slice-spacing")
    for ds in dss:
        ds.ImagePositionPatient = dss[0].ImagePositionPatient
    out.append(Case(
        "zero-slice-spacing", "every slice of a head CT at the same position (zero spacing)",
        "the slice spacing is zero: no volume; ignored with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: slice spacing unknown"))
    dss = base("head", "missing-position")
    del dss[4].ImagePositionPatient
    out.append(Case(
        "missing-position", "one slice of a head CT without Image Position (Patient)",
        "a slice that cannot be placed: no volume geometry; ignored with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: no slice geometry"))
    dss = base("head", "position-not-numeric")
    for ds in dss:
        ds.ImagePositionPatient = ["1111", "2222", "3333"]  # replaced in the encoded bytes
    out.append(Case(
        "position-not-numeric", "Image Position (Patient) 'left\\up\\far' on every slice",
        "unusable geometry is no geometry; ignored with the reason",
        tuple(Send(_replace_bytes(part10(ds), b"1111\\2222\\3333", b"left\\up\\far   "))
              for ds in dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: no slice geometry"))
    dss = base("head", "missing-slice")
    del dss[6]
    out.append(Case(
        "missing-slice", "a head CT with slice 7 of 12 missing (one 10 mm gap)",
        "routed after the quiet period, but a volume with a gap is not analysed: failed with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="bct", route_reason=BCT_RULE,
        job="failed", job_reason="non-uniform slice spacing"))
    dss = base("head", "mixed-sizes")
    ds = dss[3]
    ds.Rows = ds.Columns = 8
    ds.PixelData = _pixels(dss[4])[::2, ::2].astype("<i2").tobytes()
    out.append(Case(
        "mixed-sizes", "one slice of a head CT is 8 x 8, the others 16 x 16",
        "no single volume; ignored with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{BCT_RULE}: no slice geometry"))
    dss = base("head", "missing-pixel-spacing")
    for ds in dss:
        del ds.PixelSpacing
    out.append(Case(
        "missing-pixel-spacing", "a head CT without Pixel Spacing",
        "the model's grid is in mm: without a spacing there is no volume; the job fails with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="bct", route_reason=BCT_RULE,
        job="failed", job_reason="missing geometry (PixelSpacing)"))
    dss = base("head", "orientation-not-unit")
    for ds in dss:
        ds.ImageOrientationPatient = [2, 0, 0, 0, 2, 0]
    out.append(Case(
        "orientation-not-unit", "Image Orientation (Patient) 2\\0\\0\\0\\2\\0 (not unit vectors)",
        "the direction cosines are invalid: the job fails with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="bct", route_reason=BCT_RULE,
        job="failed", job_reason="not two orthogonal unit vectors"))
    dss = base("chest", "single-slice-chest-ct")
    out.append(Case(
        "single-slice-chest-ct", "a 'chest CT series' of one axial slice",
        "one slice is no volume for the chest-CT model; completed after the quiet period and ignored",
        _sends(dss[10:11]), series_uid=dss[0].SeriesInstanceUID, route="ignore",
        route_reason=f"{CHEST_RULE}: no slice geometry"))
    dss = base("chest", "chest-ct-localizer")
    for ds in dss:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    out.append(Case(
        "chest-ct-localizer", "a chest CT series flagged LOCALIZER in Image Type",
        "scouts are not diagnostic images; the localizer rule ignores them",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="ignore", route_reason="rule 'localizer'"))
    dss = base("chest", "ct-not-in-hu")
    for ds in dss:  # stored values HU + 1024 (air 0), read as HU: the intercept dropped on export
        hu = ds.pixel_array.astype(np.int32) + int(float(ds.RescaleIntercept))
        ds.PixelData = np.clip(hu + 1024, 0, None).astype(ds.pixel_array.dtype).tobytes()
        ds.RescaleIntercept = "0"
    out.append(Case(
        "ct-not-in-hu", "a chest CT whose Rescale Intercept is 0 instead of -1024 (air reads 0, bone 1200)",
        "windowed as HU every tissue would be white and the score meaningless: the job fails with the reason",
        _sends(dss), series_uid=dss[0].SeriesInstanceUID, route="chestct", route_reason=CHEST_RULE,
        job="failed", job_reason="do not look like Hounsfield units"))


def _sr(case: str) -> Dataset:
    """A valid Basic Text SR in the study of a phantom radiograph."""
    ref = base("cxr", case)[0]
    sr = Dataset()
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
               "AccessionNumber"):
        setattr(sr, kw, ref.get(kw))
    sr.SOPClassUID, sr.SOPInstanceUID = BASIC_TEXT_SR, uid(case, "instance")
    sr.SeriesInstanceUID, sr.Modality, sr.SeriesNumber, sr.InstanceNumber = uid(case, "sr"), "SR", 9, 1
    sr.ValueType, sr.ContinuityOfContent = "CONTAINER", "SEPARATE"
    sr.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "UNVERIFIED"
    sr.ContentDate, sr.ContentTime = "20240101", "080000"
    text = Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "No acute findings."
    text.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
    sr.ContentSequence = DicomSequence([text])
    return sr


def _non_image(out: list[Case]) -> None:
    ref = base("cxr", "basic-text-sr")[0]
    sr = _sr("basic-text-sr")
    out.append(Case(
        "basic-text-sr", "a Basic Text SR (a report, not an image)",
        "non-image objects are stored (the PACS routes whole studies) but not analysed",
        (Send(part10(sr)),), series_uid=sr.SeriesInstanceUID, route="ignore",
        route_reason="not an image SOP class"))
    pdf = Dataset()
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        setattr(pdf, kw, ref.get(kw))
    pdf.SOPClassUID, pdf.SOPInstanceUID = ENCAPSULATED_PDF, uid("encapsulated-pdf", "instance")
    pdf.SeriesInstanceUID, pdf.Modality, pdf.InstanceNumber = uid("encapsulated-pdf", "doc"), "DOC", 1
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.DocumentTitle = "requisition"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    out.append(Case(
        "encapsulated-pdf", "an Encapsulated PDF (a scanned requisition)",
        "non-image objects are stored but not analysed",
        (Send(part10(pdf)),), series_uid=pdf.SeriesInstanceUID, route="ignore",
        route_reason="not an image SOP class"))
    a = base("cxr", "two-radiographs-one-series")[0]
    b = base("cxr", "two-radiographs-one-series-b")[0]
    b.SeriesInstanceUID, b.StudyInstanceUID, b.InstanceNumber = a.SeriesInstanceUID, a.StudyInstanceUID, 2
    out.append(Case(
        "two-radiographs-one-series", "two chest radiographs in one series",
        "the radiograph model scores one image per series: the job fails with the reason",
        (Send(part10(a)), Send(part10(b))), series_uid=a.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="holds 2 images"))
    ds = base("cxr", "lateral-radiograph")[0]
    ds.ViewPosition = "LL"
    out.append(Case(
        "lateral-radiograph", "a lateral chest radiograph (View Position LL)",
        "the radiograph model is trained on frontal views; ignored with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="ignore",
        route_reason="view position LL"))
    ds = base("cxr", "zero-pixel-spacing")[0]
    ds.PixelSpacing = ds.ImagerPixelSpacing = ["0", "0"]
    out.append(Case(
        "zero-pixel-spacing", "a chest radiograph with Pixel Spacing 0\\0",
        "a zero spacing is invalid geometry: the job fails with the reason",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="zero or negative pixel spacing"))
    ds = base("cxr", "rescale-slope-nan")[0]
    ds.RescaleSlope = "NaN"
    out.append(Case(
        "rescale-slope-nan", "a chest radiograph with Rescale Slope 'NaN'",
        "a non-finite rescale makes every pixel NaN: the job fails with the reason, no NaN score",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr",
        job="failed", job_reason="NaN/inf pixel"))


def _replace_bytes(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


def _text(out: list[Case]) -> None:
    placeholder = "PLACEHOLDER^NAME^ABCDEFGHIJKLMNOPQ"  # 34 bytes, replaced in the encoded bytes
    cases: list[tuple[str, str, str, bytes, str]] = [
        ("unknown-charset", "Specific Character Set 'ISO_IR 999' (unknown) with Latin-1 bytes in the name",
         "ISO_IR 999", b"M\xfcller^J\xf6rg\xe9\xe8\xe0\xe7\xf1\xf6", "names are decoded as well as "
         "possible for display; they never decide anything, so the image is analysed"),
        ("invalid-utf8-name", "Specific Character Set 'ISO_IR 192' (UTF-8) with invalid UTF-8 in the name",
         "ISO_IR 192", b"\xff\xfe\xc3(\xa0\xa1^\xe2\x28\xa1\xf0\x28\x8c\xbc\xc0\xaf", "an undecodable "
         "name is replaced for display; the image is analysed"),
        ("iso2022-japanese-name", "a valid Japanese name in '\\ISO 2022 IR 87' (code extensions)",
         "\\ISO 2022 IR 87", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B", "a standard character "
         "set; the image is analysed and reported"),
        ("broken-iso2022", "ISO 2022 IR 87 with an escape sequence that is never closed",
         "\\ISO 2022 IR 87", b"YAMADA^\x1b$B;3ED\x1b$B\x1b$", "a broken escape sequence only garbles "
         "the name; the image is analysed"),
        ("control-chars-name", "control characters (NUL, ESC, BEL, CR) in Patient Name, no character set",
         "", b"A\x00B\x1bC\x07D\rE^\x00\x00F\x08G\x7fH", "control characters are data, not commands "
         "(logs never show names); the image is analysed"),
    ]
    for cid, desc, charset, raw, why in cases:
        ds = base("cxr", cid)[0]
        if charset:
            ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
        elif "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        ds.PatientName = placeholder
        data = _replace_bytes(part10(ds), placeholder.encode(), raw.ljust(len(placeholder), b" "))
        out.append(Case(cid, desc, why, (Send(data),), series_uid=ds.SeriesInstanceUID,
                        route="cxr", job="done"))
    ds = base("cxr", "long-name")[0]
    ds.PatientName = "A" * 3000 + "^" + "B" * 3000
    ds.StudyDescription = "XR CHEST " + "X" * 5000
    out.append(Case(
        "long-name", "Patient Name of 6001 characters and a 5009-character Study Description",
        "values beyond their VR's length are cut for the index, not refused; the image is analysed",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr", job="done"))


def _private(out: list[Case]) -> None:
    ds = base("cxr", "private-ob-4mb")[0]
    ds.add_new(0x00290010, "LO", "BADINPUT VENDOR")
    ds.add_new(0x00291010, "OB", bytes(4 * 1024 * 1024))
    out.append(Case(
        "private-ob-4mb", "a 4 MB private OB element in the header",
        "private data is stored as received and never decoded; the image is analysed",
        (Send(part10(ds), mode="dataset"),), series_uid=ds.SeriesInstanceUID, route="cxr", job="done"))
    ds = base("cxr", "private-text-64k")[0]
    ds.add_new(0x00290010, "LO", "BADINPUT VENDOR")
    ds.add_new(0x00291011, "LO", "Z" * 65534)  # LO allows 64 characters; 65534: the 16-bit length's most
    out.append(Case(
        "private-text-64k", "a private LO element of 65534 characters (LO allows 64)",
        "an over-long private value is data, not a reason to refuse; the image is analysed",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr", job="done"))
    ds = base("cxr", "private-deep-sequence")[0]
    ds.add_new(0x00290010, "LO", "BADINPUT VENDOR")
    inner = Dataset()
    inner.add_new(0x00290010, "LO", "BADINPUT VENDOR")
    inner.add_new(0x00291012, "LO", "bottom")
    for _ in range(200):
        outer = Dataset()
        outer.add_new(0x00290010, "LO", "BADINPUT VENDOR")
        outer.add_new(0x00291020, "SQ", DicomSequence([inner]))
        inner = outer
    ds.add_new(0x00291020, "SQ", DicomSequence([inner]))
    out.append(Case(
        "private-deep-sequence", "a private sequence nested 200 levels deep",
        "deep but finite nesting parses; the image is analysed",
        (Send(part10(ds)),), series_uid=ds.SeriesInstanceUID, route="cxr", job="done"))
    ds = base("cxr", "private-after-pixels")[0]
    data = part10(ds)
    tail = (b"\xe1\x7f\x10\x00LO\x10\x00" + b"SIEMENS CSA NON " + b"\xe1\x7f\x10\x10OB\x00\x00"
            + (65536).to_bytes(4, "little") + bytes(65536))
    out.append(Case(
        "private-after-pixels", "64 kB of private data after Pixel Data (as some CT vendors write)",
        "elements after the pixel data are legal; stored as received and analysed",
        (Send(data + tail),), series_uid=ds.SeriesInstanceUID, route="cxr", job="done"))


def cases() -> list[Case]:
    """The whole corpus, in sending order."""
    out: list[Case] = []
    with lenient():
        for part in (_negotiation, _parse, _uids, _pixel_data, _syntaxes, _photometric, _multiframe,
                     _geometry, _non_image, _text, _private):
            part(out)
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return out


# --------------------------------------------------------------------------- delivery


def _contexts(case: Case) -> list[tuple[str, tuple[str, ...]]]:
    if case.propose:
        return list(case.propose)
    seen: dict[tuple[str, str], None] = {}
    for s in case.sends:
        seen[(s.sop_class, s.transfer_syntax)] = None
    return [(sop, (ts,)) for sop, ts in seen]


def deliver_all(all_cases: list[Case], host: str, port: int, workdir: Path, *,
                threads: int = 4) -> dict[str, Delivered]:
    """Send every case, each over its own association, ``threads`` associations at a time."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # a file path is sent as its bytes are (datasets: re-encoded)
    try:
        with lenient(), ThreadPoolExecutor(threads) as pool:  # (settings are global: set once here)
            done = pool.map(lambda c: (c.id, deliver(c, host, port, workdir)), all_cases)
            return dict(done)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def deliver(case: Case, host: str, port: int, workdir: Path) -> Delivered:
    """Send ``case`` over one association (released at the end) and record the answers.

    Raw sends need pynetdicom's chunked mode (``_config.STORE_SEND_CHUNKED_DATASET``) and the
    invalid values need :func:`lenient`; :func:`deliver_all` sets both.
    """
    ae = AE(ae_title="BADINPUT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop, tss in _contexts(case):
        ae.add_requested_context(sop, list(tss))
    ae.add_requested_context(Verification)  # as storescu does: the association stands on its own
    assoc = ae.associate(host, port, ae_title=case.called_ae)
    if not assoc.is_established:
        return Delivered("association-rejected" if assoc.is_rejected else "aborted")
    out = Delivered("accepted")
    with contextlib.suppress(AttributeError, OSError):  # no 40 ms Nagle/delayed-ACK wait per message
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    try:
        out.rejected = sorted({str(ts) for cx in assoc.rejected_contexts for ts in cx.transfer_syntax})
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        for i, s in enumerate(case.sends):
            if (s.sop_class, s.transfer_syntax) not in accepted:
                out.negotiation = "context-rejected"
                out.statuses.append((None, "no accepted presentation context"))
                continue
            try:  # (a sender-side refusal is recorded, not raised: the case's check reports it)
                if s.mode == "raw":  # sent as the file holds it (chunked mode, see deliver_all)
                    path = workdir / f"{case.id}-{i}.dcm"
                    path.write_bytes(s.data)
                    st = assoc.send_c_store(path)
                else:
                    st = assoc.send_c_store(pydicom.dcmread(io.BytesIO(s.data)))
            except (ValueError, AttributeError) as exc:
                out.statuses.append((None, f"the sender refused: {exc}"))
                continue
            if not st or "Status" not in st:
                out.statuses.append((None, "no response (association aborted?)"))
                if not assoc.is_established:
                    break
                continue
            out.statuses.append((int(st.Status), str(st.get("ErrorComment", ""))))
    finally:
        if assoc.is_established:
            assoc.release()
    return out
