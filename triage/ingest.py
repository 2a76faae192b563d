"""Received bytes -> a checked header -> a durable blob -> index rows.

This is the part of C-STORE handling that does not depend on the network library, so it
is tested directly and reused by anything that stores instances (the SCP, tests, benchmarks).
The bytes are stored exactly as received; the header is parsed only to check and index.

Statuses (PS3.4 Annex B.2.3; ``0xC0xx`` codes are this node's "cannot understand"
reasons, each with an Error Comment):

========  ==================================================================
0x0000    stored and indexed (or the identical bytes were already stored)
0xA700    out of resources: disk above the high-water mark, a failed write or
          an unavailable database; the sender should retry later
0xA900    data set does not match the SOP class (an image without pixel data,
          pixel data shorter than its header says, SOP Class differs from the
          one negotiated)
0xC001    cannot be parsed (not DICOM, truncated header)
0xC002    missing or malformed UID (Study, Series or SOP Instance UID)
0xC003    image dimensions beyond the configured limits (refused before decoding)
========  ==================================================================
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, SQLAlchemyError

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import AuditEvent, Instance, Job, Series, Study, utcnow
from triage.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

__all__ = ["Header", "Ingest", "Refused", "StoreOutcome", "parse_header"]

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_PARSE = 0xC001
BAD_UID = 0xC002
TOO_LARGE = 0xC003

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ROUTING_ATTRS = ("Modality", "BodyPartExamined", "StudyDescription", "SeriesDescription",
                  "ProtocolName", "ImageType", "ViewPosition", "Manufacturer", "SliceThickness",
                  "PatientOrientation", "ImagesInAcquisition", "SeriesNumber")


class Refused(Exception):  # noqa: N818 (a status, not an error of ours)
    """The instance is refused with a DIMSE status and a reason (no patient identifiers)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What indexing and routing need from one instance's header."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    is_image: bool
    rows: int | None
    columns: int | None
    frames: int | None
    instance_number: int | None
    position: list[float] | None
    orientation: list[float] | None
    expected_count: int | None
    study: dict[str, str | None]
    attributes: dict[str, Any]


def _value(ds: Dataset, name: str) -> Any:
    """``ds.get(name)``, None when pydicom cannot convert the value. It converts a value when
    it is first read: a length that does not fit the VR (BytesLengthException), an unknown VR
    (NotImplementedError), ... are raised there, not by the parse: such a value is malformed."""
    try:
        return ds.get(name)
    except Exception:
        return None


def _check_uid(ds: Dataset, name: str) -> str:
    try:
        value = ds.get(name)
        text = "" if value is None else str(value).strip("\x00 ")
    except Exception:  # (see _value; str() of a sequence converts the elements of its items)
        raise Refused(BAD_UID, f"malformed {name} (cannot be read as a UID)") from None
    if text == "":
        raise Refused(BAD_UID, f"missing {name}")
    if len(text) > 64 or not _UID_RE.match(text):
        shown = f"{len(text)} characters" if len(text) > 64 else "characters other than digits and dots"
        raise Refused(BAD_UID, f"malformed {name} ({shown})")
    return text


def _int(ds: Dataset, name: str) -> int | None:
    """An integer attribute, or None when absent, malformed or beyond 32 bits (the columns)."""
    try:
        v = _value(ds, name)
        out = None if v is None or v == "" else int(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if out is None or -(2**31) <= out < 2**31 else None


def _floats(ds: Dataset, name: str, n: int) -> list[float] | None:
    try:
        v = _value(ds, name)
        if v is None:
            return None
        out = [float(x) for x in (v if isinstance(v, list | tuple | pydicom.multival.MultiValue) else [v])]
        return out if len(out) == n and all(math.isfinite(x) for x in out) else None
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, name: str, limit: int = 64) -> str | None:
    try:
        v = ds.get(name)
        if v is None:
            return None
        s = str(v).strip()
    except Exception:  # a value in an undecodable character set, or one pydicom cannot convert
        return None
    return s[:limit] if s else None


def _json_value(v: Any) -> Any:
    if isinstance(v, Dataset | pydicom.sequence.Sequence):  # a sequence where a value belongs: none
        return None
    if isinstance(v, pydicom.multival.MultiValue | list | tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, int | float) and not isinstance(v, bool):
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else None  # JSON has no NaN
        return int(v)
    return str(v)[:128]


def _is_image_class(sop_class: str) -> bool:
    name = UID(sop_class).name
    return "Image Storage" in name


def _native_pixel_bytes(ds: Dataset, rows: int, cols: int, frames: int) -> int:
    bits = _int(ds, "BitsAllocated")
    spp = _int(ds, "SamplesPerPixel") or 1
    if bits not in (1, 8, 16, 32, 64):
        raise Refused(DOES_NOT_MATCH, f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    total_bits = rows * cols * frames * spp * bits
    return (total_bits + 7) // 8


def _pixel_element(data: bytes, offset: int, ts: UID) -> tuple[str | None, int, int]:
    """(keyword, value offset, value length) of the pixel element at ``offset``, read from
    its element header; ``(None, 0, 0)`` when the data set ends there."""
    if offset >= len(data):
        return None, 0, 0
    if offset + 8 > len(data):
        raise Refused(CANNOT_PARSE, "the data set ends inside an element header")
    order = "big" if ts == "1.2.840.10008.1.2.2" else "little"
    group = int.from_bytes(data[offset:offset + 2], order)  # type: ignore[arg-type]
    elem = int.from_bytes(data[offset + 2:offset + 4], order)  # type: ignore[arg-type]
    keyword = {0x0010: "PixelData", 0x0008: "FloatPixelData", 0x0009: "DoubleFloatPixelData"}.get(elem)
    if group != 0x7FE0 or keyword is None:
        raise Refused(CANNOT_PARSE, f"unexpected element ({group:04X},{elem:04X}) after the header")
    if ts.is_implicit_VR:
        return keyword, offset + 8, int.from_bytes(data[offset + 4:offset + 8], order)  # type: ignore[arg-type]
    if offset + 12 > len(data):
        raise Refused(CANNOT_PARSE, "the data set ends inside the pixel data header")
    return keyword, offset + 12, int.from_bytes(data[offset + 8:offset + 12], order)  # type: ignore[arg-type]


_ITEM = 0xE000FFFE  # (FFFE,E000) read as one little-endian uint32
_SEQ_DELIMITER = 0xE0DDFFFE


def _check_fragments(data: bytes, pos: int) -> None:
    """Encapsulated pixel data: items up to the sequence delimiter, inside ``data``
    (the Basic Offset Table item first, then at least one fragment)."""
    items = 0
    while True:
        if pos + 8 > len(data):
            raise Refused(DOES_NOT_MATCH, "encapsulated pixel data is truncated (no sequence delimiter)")
        tag = int.from_bytes(data[pos:pos + 4], "little")
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8
        if tag == _SEQ_DELIMITER:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise Refused(DOES_NOT_MATCH, "encapsulated pixel data is malformed (not an item)")
        pos += length
        items += 1
    if items < 2:
        raise Refused(DOES_NOT_MATCH, "encapsulated pixel data holds no fragment")


def _check_complete(ds: Dataset, data: bytes) -> None:
    """pydicom stops quietly at the end of the bytes: the last element must be whole."""
    if not len(ds):
        return
    last = ds.get_item(max(ds.keys()), keep_deferred=True)  # as read: converting it may raise
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if (length is not None and length != 0xFFFFFFFF and isinstance(value, bytes | bytearray)
            and len(value) < length):
        raise Refused(CANNOT_PARSE, "the data set is truncated (its last element is cut short)")


def _check_pixels(data: bytes, ds: Dataset, ts: UID, offset: int, rows: int, cols: int, frames: int) -> None:
    """The pixel element is there and as long as the header says, without reading its value."""
    keyword, start, length = _pixel_element(data, offset, ts)
    if keyword is None:
        raise Refused(DOES_NOT_MATCH, "image SOP class without pixel data")
    if length == 0xFFFFFFFF:  # encapsulated: fragments follow
        if keyword != "PixelData" or not ts.is_encapsulated:
            raise Refused(DOES_NOT_MATCH, "undefined-length pixel data in a native transfer syntax")
        _check_fragments(data, start)
        return
    have = min(length, len(data) - start)
    if keyword == "PixelData":
        need = _native_pixel_bytes(ds, rows, cols, frames)
        if _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
            need = need * 2 // 3  # two chroma samples are shared by each pair of pixels
    else:
        need = rows * cols * frames * (4 if keyword == "FloatPixelData" else 8)
    if have < need:
        raise Refused(DOES_NOT_MATCH, f"pixel data has {have} bytes, the header needs {need}")


def _at_pixels(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) in (0x7FE00010, 0x7FE00008, 0x7FE00009)


class _CutShort(Exception):  # noqa: N818
    pass


class _Strict(io.BytesIO):
    """pydicom ends a data set quietly where fewer than 8 bytes remain for the next element
    header: a data set cut inside a tag would pass as a complete, shorter one. Element and
    item headers (and short values) are read at most 12 bytes at a time; a short read of
    those is a truncation. (Longer values cut short are caught by ``_check_complete``.)"""

    def read(self, n: int | None = -1, /) -> bytes:
        out = super().read(n)
        if n is not None and 0 < len(out) < n <= 12:
            raise _CutShort
        return out


def parse_header(data: bytes, *, negotiated_sop_class: str | None = None, max_side: int = 16384,
                 max_frames: int = 4096, dataset_start: int | None = None,
                 transfer_syntax: str | None = None, affected_sop_instance: str | None = None) -> Header:
    """Parse and check one received instance (Part 10 bytes with file meta).

    Only the header is parsed; the pixel element is checked from its element header (present,
    long enough for Rows x Columns x frames, fragments parse), never copied or decoded.
    ``dataset_start`` and ``transfer_syntax`` (the receive path knows both) skip parsing the
    file meta again.
    """
    fp = _Strict(data)
    ts = UID(transfer_syntax) if transfer_syntax else None
    try:
        if dataset_start is not None and ts is not None and ts.is_transfer_syntax and not ts.is_deflated:
            fp.seek(dataset_start)
            ds = pydicom.filereader.read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian,
                                                 stop_when=_at_pixels)
        else:
            ds = pydicom.dcmread(fp, force=False, stop_before_pixels=True)
            ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    except _CutShort:
        raise Refused(CANNOT_PARSE, "the data set is truncated (it ends inside an element)") from None
    except Exception as exc:
        raise Refused(CANNOT_PARSE, f"cannot parse the data set ({type(exc).__name__})") from exc
    if len(ds) and ts.is_transfer_syntax and ds.original_encoding[0] not in (None, ts.is_implicit_VR):
        # pydicom quietly switches to the VR encoding it finds; the stored file would claim another
        vr = "implicit" if ts.is_implicit_VR else "explicit"
        raise Refused(CANNOT_PARSE, f"the data set is not encoded in {vr} VR as its transfer syntax says")
    header_end = fp.tell()
    _check_complete(ds, data)
    sop_class = _check_uid(ds, "SOPClassUID")
    sop_uid = _check_uid(ds, "SOPInstanceUID")
    series_uid = _check_uid(ds, "SeriesInstanceUID")
    study_uid = _check_uid(ds, "StudyInstanceUID")
    if negotiated_sop_class is not None and sop_class != negotiated_sop_class:
        raise Refused(DOES_NOT_MATCH, "SOP Class UID in the data set differs from the negotiated one")
    if affected_sop_instance is not None and sop_uid != affected_sop_instance:
        raise Refused(DOES_NOT_MATCH, "SOP Instance UID in the data set differs from the request's")

    is_image = _is_image_class(sop_class)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames")
    if rows is not None or cols is not None:
        if not rows or not cols or rows < 0 or cols < 0:
            raise Refused(DOES_NOT_MATCH, f"invalid image size {rows} x {cols}")
        if rows > max_side or cols > max_side:
            raise Refused(TOO_LARGE, f"image {rows} x {cols} exceeds the limit of {max_side} per side")
        if frames is not None and not 1 <= frames <= max_frames:
            raise Refused(TOO_LARGE, f"NumberOfFrames {frames} outside 1..{max_frames}")
    if is_image:
        if rows is None or cols is None:
            raise Refused(DOES_NOT_MATCH, "image SOP class without Rows/Columns")
        if ts.is_deflated:  # offsets in the stream are not offsets in ``data``: parse it all
            full = pydicom.dcmread(io.BytesIO(data))
            if "PixelData" not in full:
                raise Refused(DOES_NOT_MATCH, "image SOP class without pixel data")
        else:
            _check_pixels(data, ds, ts, header_end, rows, cols, frames or 1)
    attributes = {k: _json_value(v) for k in _ROUTING_ATTRS if (v := _value(ds, k)) not in (None, "")}
    study = {"patient_id": _text(ds, "PatientID"), "patient_name": _text(ds, "PatientName", 324),
             "accession_number": _text(ds, "AccessionNumber", 16), "study_date": _text(ds, "StudyDate", 8),
             "study_description": _text(ds, "StudyDescription")}
    return Header(sop_class_uid=sop_class, sop_instance_uid=sop_uid, series_instance_uid=series_uid,
                  study_instance_uid=study_uid, is_image=is_image, rows=rows, columns=cols,
                  frames=frames, instance_number=_int(ds, "InstanceNumber"),
                  position=_floats(ds, "ImagePositionPatient", 3),
                  orientation=_floats(ds, "ImageOrientationPatient", 6),
                  expected_count=_int(ds, "ImagesInAcquisition"), study=study, attributes=attributes)




def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def part10_prefix(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str | None) -> bytes:
    """Preamble, 'DICM' and the File Meta Information (PS3.10 7.1) for a received data set.

    pydicom's general writer validates every element (about 0.5 ms per instance on the
    receive path); these eight elements are fixed, so they are encoded directly.
    """
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
        *([_meta_element(0x0016, b"AE", source_ae.strip().encode("ascii", "replace")[:16])]
          if source_ae else []),
    ])
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"))


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in Part 10 bytes: after the preamble, 'DICM' and group 0002.

    Group 0002 is always explicit VR little endian (PS3.10 7.1); bytes without 'DICM' are a
    bare data set (offset 0).
    """
    if data[128:132] != b"DICM":
        return 0
    pos = 132
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        if data[pos + 4:pos + 6] in _LONG_VRS:
            pos += 12 + (struct.unpack_from("<I", data, pos + 8)[0] if pos + 12 <= len(data) else 0)
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return min(pos, len(data))


def same_dataset(a: bytes, b: bytes) -> bool:
    """Whether two Part 10 files hold the same data set byte for byte, whatever their file meta
    says (the sender's AE title, implementation UID...): a re-send from another AE is no change."""
    return a[dataset_offset(a):] == b[dataset_offset(b):]


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    series_id: int | None = None
    instance_id: int | None = None
    duplicate: bool = False
    blob: str | None = None  # the stored file a duplicate matched
    revision: int = 1
    reopened: bool = False
    reason: str | None = None


class Ingest:
    """Checks, stores and indexes instances; safe to call from many threads."""

    def __init__(self, db: Database, blobs: BlobStore, *, high_water: float = 0.95,
                 max_side: int = 16384, max_frames: int = 4096) -> None:
        self.db = db
        self.blobs = blobs
        self.high_water = high_water
        self.max_side = max_side
        self.max_frames = max_frames
        self._study_ids: dict[str, int] = {}  # Study Instance UID -> row id, once committed

    def store_dataset(self, dataset: bytes, *, sop_class: str, sop_instance: str, transfer_syntax: str,
                      calling_ae: str | None = None, peer: str | None = None,
                      association_id: str | None = None) -> StoreOutcome:
        """Store a C-STORE data set (bytes as received, without file meta) as a Part 10 file."""
        if not (_UID_RE.match(sop_class) and _UID_RE.match(transfer_syntax)) or len(sop_instance) > 64 \
                or not _UID_RE.match(sop_instance):
            why = "malformed Affected SOP Class/Instance UID or transfer syntax in the request"
            log.warning("refused an instance from %s (%s): 0x%04X %s", calling_ae, peer, BAD_UID, why)
            return StoreOutcome(status=BAD_UID, reason=why)
        prefix = part10_prefix(sop_class, sop_instance, transfer_syntax, calling_ae)
        return self.store(prefix + dataset, transfer_syntax=transfer_syntax, negotiated_sop_class=sop_class,
                          calling_ae=calling_ae, peer=peer, association_id=association_id,
                          dataset_start=len(prefix), affected_sop_instance=sop_instance)

    def store(self, data: bytes, *, transfer_syntax: str | None = None,
              negotiated_sop_class: str | None = None, calling_ae: str | None = None,
              peer: str | None = None, association_id: str | None = None,
              dataset_start: int | None = None, affected_sop_instance: str | None = None) -> StoreOutcome:
        """Store one Part 10 instance; returns the status to answer (never raises for bad input)."""
        try:
            header = parse_header(data, negotiated_sop_class=negotiated_sop_class,
                                  max_side=self.max_side, max_frames=self.max_frames,
                                  dataset_start=dataset_start,
                                  transfer_syntax=transfer_syntax if dataset_start is not None else None,
                                  affected_sop_instance=affected_sop_instance)
            return self._store(data, header, transfer_syntax, calling_ae, peer, association_id)
        except Refused as exc:
            log.warning("refused an instance from %s (%s): 0x%04X %s", calling_ae, peer, exc.status,
                        exc.reason)
            return StoreOutcome(status=exc.status, reason=exc.reason)

    def _check_disk(self, size: int) -> None:
        u = self.blobs.usage()
        if u.used_fraction > self.high_water or u.free < 2 * size:
            raise Refused(OUT_OF_RESOURCES, f"disk {100 * u.used_fraction:.1f}% used, above the "
                                            f"high-water mark of {100 * self.high_water:.0f}%")

    def _store(self, data: bytes, h: Header, transfer_syntax: str | None, calling_ae: str | None,
               peer: str | None, association_id: str | None) -> StoreOutcome:
        digest = hashlib.sha256(data).hexdigest()
        self._check_disk(len(data))
        # Written before the duplicate check (inside the index transaction): a re-send of
        # the same bytes rewrites the same file, which is rare and harmless.
        key = self.blobs.key("instance", h.sop_instance_uid, digest, group=h.series_instance_uid)
        try:
            self.blobs.put(key, data)
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, f"cannot write the instance ({exc.strerror or exc})") from exc
        ts = transfer_syntax or ""
        for attempt in range(4):
            try:
                out = self._index(h, key, digest, data, ts, calling_ae, peer, association_id)
                if out.duplicate and out.blob != key:
                    self.blobs.delete(key)  # the same data set is already stored under another name
                return out
            except Refused:
                self.blobs.delete(key)  # refused while indexing: no row will point at it
                raise
            except IntegrityError:
                # another association indexed the same study/series/instance at the same moment
                self._study_ids.clear()
                if attempt == 3:
                    raise Refused(OUT_OF_RESOURCES, "could not index the instance (concurrent "
                                                    "updates); retry") from None
            except DataError as exc:  # a header value the database cannot hold: retrying will not help
                self.blobs.delete(key)
                raise Refused(DOES_NOT_MATCH, "a header value is out of range for the index") from exc
            except (OperationalError, SQLAlchemyError) as exc:
                raise Refused(OUT_OF_RESOURCES, f"database unavailable ({type(exc).__name__})") from exc
        raise AssertionError("unreachable")

    def _same_as_stored(self, key: str, data: bytes) -> bool:
        try:
            return same_dataset(self.blobs.get(key), data)
        except OSError:
            return False

    def _index(self, h: Header, key: str, digest: str, data: bytes, ts: str, calling_ae: str | None,
               peer: str | None, association_id: str | None) -> StoreOutcome:
        now = utcnow()
        with self.db.session() as s:
            study_id = self._study_ids.get(h.study_instance_uid)
            if study_id is None:
                study = s.scalars(select(Study).where(Study.study_instance_uid == h.study_instance_uid)
                                  ).first()
                if study is None:
                    study = Study(study_instance_uid=h.study_instance_uid, **h.study)
                    s.add(study)
                    s.flush()
                study_id = study.id
            # FOR UPDATE: concurrent associations adding to one series serialise here on
            # PostgreSQL (SQLite's BEGIN IMMEDIATE already does).
            series = s.scalars(select(Series).where(Series.series_instance_uid == h.series_instance_uid)
                               .with_for_update()).first()
            reopened = False
            if series is None:
                series = Series(study_id=study_id, series_instance_uid=h.series_instance_uid,
                                modality=_str_or_none(h.attributes.get("Modality"), 16),
                                series_description=_str_or_none(h.attributes.get("SeriesDescription"), 64),
                                attributes=h.attributes, first_received_at=now, last_received_at=now)
                s.add(series)
                s.flush()
            elif series.study_id != study_id:
                raise Refused(DOES_NOT_MATCH, "the series already belongs to another study")
            prev = s.scalars(select(Instance).where(Instance.sop_instance_uid == h.sop_instance_uid,
                                                    Instance.current.is_(True))).first()
            revision = 1
            if prev is not None:
                if prev.sha256 == digest or self._same_as_stored(prev.blob, data):
                    # an identical re-send (perhaps from another AE): nothing new to store, but
                    # this association carried it too, so a re-push of a whole series (e.g.
                    # after a crash) can still finish early at its release.
                    prev.association_id = association_id
                    return StoreOutcome(status=SUCCESS, series_id=prev.series_id, instance_id=prev.id,
                                        duplicate=True, revision=prev.revision, blob=prev.blob)
                if prev.series_id != series.id:
                    raise Refused(DOES_NOT_MATCH, "the SOP instance already belongs to another series")
                prev.current = False
                revision = prev.revision + 1
                series.changed = True
            else:
                series.instance_count += 1
            if series.state != "receiving":
                reopened = True
                series.state = "receiving"
                series.version += 1
                series.completed_at = None
                series.released_at = None
                # a queued job for the older version would analyse part of the series
                s.execute(update(Job).where(Job.series_id == series.id, Job.state == "queued")
                          .values(state="superseded", finished_at=now,
                                  reason=f"superseded: the series was reopened as version {series.version}")
                          .execution_options(synchronize_session=False))
                s.add(AuditEvent(actor="scp", action="series reopened", series_id=series.id,
                                 detail={"why": "changed instance" if prev is not None else "late instance",
                                         "version": series.version}))
            series.last_received_at = now
            inst = Instance(series_id=series.id, sop_instance_uid=h.sop_instance_uid, revision=revision,
                            sop_class_uid=h.sop_class_uid, transfer_syntax_uid=ts[:64], blob=key,
                            sha256=digest, size=len(data), is_image=h.is_image, rows=h.rows,
                            columns=h.columns, frames=h.frames, instance_number=h.instance_number,
                            position=h.position, orientation=h.orientation, expected_count=h.expected_count,
                            calling_ae=calling_ae, peer_address=peer, association_id=association_id,
                            received_at=now)
            s.add(inst)
            s.flush()
            out = StoreOutcome(status=SUCCESS, series_id=series.id, instance_id=inst.id,
                               revision=revision, reopened=reopened)
        if len(self._study_ids) > 10_000:
            self._study_ids.clear()
        self._study_ids[h.study_instance_uid] = study_id  # committed: safe to remember
        return out


def _str_or_none(v: Any, limit: int) -> str | None:
    return None if v is None else str(v)[:limit]
