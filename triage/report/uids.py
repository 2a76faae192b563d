"""Deterministic UIDs of everything the node produces.

Every UID here is an ISO/IEC 9834-8 ``2.25.`` UID: the integer of a name-based (version 5)
UUID, at most 44 characters. The names are built from the database identity of a result
(``Result.id`` and ``Result.version``), never from anything received, so

* a resend of the same result carries the same SOP Instance UIDs and is idempotent at the
  PACS (it replaces, or is ignored as, the instance it already holds);
* a re-analysis (a new ``Result.version``: late images, a new model bundle) gets new UIDs,
  i.e. new instances in new series, and its SR names its predecessor.

The namespace is fixed forever: changing it would change every output UID and make a PACS
see every resend as a new object.
"""

from __future__ import annotations

import uuid

__all__ = ["OUTPUTS", "device_uid", "output_uid", "tracking_uid"]

_NAMESPACE = uuid.UUID("2b4e9bbc-0a9a-5353-ad62-3b9049dcab93")  # uuid5(URL, "urn:triage-node:report-uids:v1")
_SCHEME = "triage-report-v1"
_SEP = "\x1f"  # never inside the parts (ints and fixed words), so names cannot collide

OUTPUTS = frozenset({"sr", "seg-binary", "seg-fractional", "sr-series", "seg-series", "sc-series",
                     *(f"sc{i}" for i in range(1, 9))})
"""The ``what`` values :func:`output_uid` accepts."""


def _uid(*parts: object) -> str:
    name = _SEP.join([_SCHEME, *(str(p) for p in parts)])
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def _check_identity(result_id: int, version: int) -> None:
    if isinstance(result_id, bool) or not isinstance(result_id, int) or result_id < 0:
        raise ValueError(f"result_id must be a non-negative integer, got {result_id!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")


def _installation(installation: str) -> list[str]:
    if _SEP in installation:
        raise ValueError("an installation id cannot contain the separator")
    return [installation] if installation else []


def output_uid(result_id: int, version: int, what: str, installation: str = "") -> str:
    """The UID of output ``what`` (one of :data:`OUTPUTS`) of version ``version`` of result
    ``result_id`` of the node ``installation`` (its random ``installation_id``, so that two
    nodes, or one reinstalled, never produce the same UID): the same arguments always give
    the same UID (<= 64 characters)."""
    _check_identity(result_id, version)
    if what not in OUTPUTS:
        raise ValueError(f"what must be one of {sorted(OUTPUTS)}, got {what!r}")
    return _uid("output", *_installation(installation), result_id, version, what)


def tracking_uid(result_id: int, version: int, lesion_index: int, installation: str = "") -> str:
    """Tracking Unique Identifier of lesion ``lesion_index`` (0-based) of a result version
    (``-1``: the whole-series measurement group)."""
    _check_identity(result_id, version)
    if isinstance(lesion_index, bool) or not isinstance(lesion_index, int) or lesion_index < -1:
        raise ValueError(f"lesion_index must be an integer >= -1, got {lesion_index!r}")
    return _uid("tracking", *_installation(installation), result_id, version, lesion_index)


def device_uid(bundle_name: str, bundle_version: str, bundle_fingerprint: str) -> str:
    """Device UID of the algorithm: one model bundle (name, version and the fingerprint of
    its training data), so it changes whenever the bundle does."""
    for label, value in (("bundle_name", bundle_name), ("bundle_version", bundle_version),
                         ("bundle_fingerprint", bundle_fingerprint)):
        if not isinstance(value, str):
            raise TypeError(f"{label} must be a string, got {type(value).__name__}")
    return _uid("device", len(bundle_name), bundle_name, len(bundle_version), bundle_version,
                bundle_fingerprint.lower())
