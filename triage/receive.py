"""The storage SCP (pynetdicom): C-ECHO and C-STORE for every storage SOP class.

Each C-STORE is written as received (``event.encoded_dataset()``, never decoded and
re-encoded), fsynced and indexed by :class:`triage.ingest.Ingest` before the handler
returns the status, so 0x0000 means durable. A normal release runs the early-finish check
for the series the association carried (:func:`triage.assemble.on_release`).

Access control: the called AE title must match, calling AE titles and client networks
can be restricted (a connection from a network not allowed is closed before association
negotiation), and TLS with client certificates is optional.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import uuid
import weakref
from ipaddress import ip_address, ip_network
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from storage.blobs import BlobStore
from storage.db import Database
from triage.assemble import on_release
from triage.config import ReceiveSettings, Settings
from triage.identity import node_ae
from triage.ingest import OUT_OF_RESOURCES, Ingest

# JPIP Referenced Deflate and JPIP HTJ2K Referenced Deflate: deflated too, but pydicom's
# is_deflated does not flag them
JPIP_DEFLATE = ("1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205")

__all__ = ["StorageSCP"]

log = logging.getLogger(__name__)


class _Server(ThreadedAssociationServer):
    """Closes connections from networks that are not allowed; sets TCP_NODELAY."""

    allowed: tuple[Any, ...] = ()  # networks; set per server by StorageSCP.start

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed:
            return True
        try:
            addr = ip_address(client_address[0])
        except (ValueError, IndexError, TypeError):
            return False
        mapped = getattr(addr, "ipv4_mapped", None)  # an IPv4 peer on a dual-stack socket
        if any(addr in net or (mapped is not None and mapped in net) for net in self.allowed):
            return True
        log.warning("connection from %s refused: not in receive.allowed_networks", client_address[0])
        return False

    def get_request(self) -> tuple[Any, Any]:
        # Plain accept: the TLS handshake runs in the connection's own thread (below), so a
        # client that connects and stays silent cannot hold up everyone else's accept.
        assert self.socket is not None
        sock, addr = self.socket.accept()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(self.ae.acse_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except OSError as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def _ssl_context(cfg: ReceiveSettings) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls.certificate), str(cfg.tls.key))
    if cfg.tls.client_ca is not None:
        ctx.load_verify_locations(cafile=str(cfg.tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StorageSCP:
    """The node's C-STORE/C-ECHO acceptor."""

    def __init__(self, settings: Settings, db: Database | None = None,
                 blobs: BlobStore | None = None) -> None:
        self.settings = settings
        cfg = settings.receive
        self.db = db or Database(settings.database_url)
        self.blobs = blobs or BlobStore(settings.blob_root, fsync=settings.storage.fsync)
        self.ingest = Ingest(self.db, self.blobs, high_water=settings.storage.high_water,
                             max_side=cfg.max_side, max_frames=cfg.max_frames)
        ae = node_ae(ae_title=cfg.ae_title)
        # Every storage SOP class with every transfer syntax pynetdicom knows, compressed
        # too, except Deflate: a few MB of deflated zeros inflate to gigabytes before any
        # size could be checked (a sender that proposes it also proposes an uncompressed one).
        syntaxes = [t for t in ALL_TRANSFER_SYNTAXES if not UID(t).is_deflated and t not in JPIP_DEFLATE]
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, syntaxes)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.require_called_aet = cfg.require_called_ae
        ae.require_calling_aet = list(cfg.allowed_calling_aes)
        self.ae = ae
        self._server: _Server | None = None
        self._assoc_ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._stored: set[str] = set()  # associations that stored something: those to check at release
        self._refused: set[str] = set()  # ...and those that refused something: their senders retry
        self._lock = threading.Lock()
        self.handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                         (evt.EVT_ESTABLISHED, self._on_established), (evt.EVT_RELEASED, self._on_released),
                         (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_REJECTED, self._on_rejected)]

    # ------------------------------------------------------------------ events

    def _assoc_id(self, assoc: Any) -> str:
        with self._lock:
            aid = self._assoc_ids.get(assoc)
            if aid is None:
                aid = self._assoc_ids[assoc] = uuid.uuid4().hex
            return aid

    def _on_established(self, event: Any) -> None:
        r = event.assoc.requestor
        log.info("association from %s (%s:%s) accepted", r.ae_title, r.address, r.port)
        self._assoc_id(event.assoc)

    def _on_rejected(self, event: Any) -> None:
        r = event.assoc.requestor
        log.warning("association from %s (%s) rejected", r.ae_title, r.address)

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> Dataset | int:
        r = event.assoc.requestor
        try:
            data = event.encoded_dataset(include_meta=False)  # the bytes as sent
            sop_instance = str(event.request.AffectedSOPInstanceUID or "")
        except Exception as exc:  # the peer's bytes could not even be framed
            log.warning("C-STORE from %s: cannot read the data set (%s)", r.ae_title, type(exc).__name__)
            return _status(0xC001, "cannot read the data set")
        aid = self._assoc_id(event.assoc)
        outcome = self.ingest.store_dataset(
            data, sop_class=str(event.context.abstract_syntax), sop_instance=sop_instance,
            transfer_syntax=str(event.context.transfer_syntax), calling_ae=str(r.ae_title),
            peer=str(r.address), association_id=aid)
        with self._lock:
            (self._stored if outcome.status == 0x0000 else self._refused).add(aid)
        if outcome.status == 0x0000:
            return 0x0000
        return _status(outcome.status, outcome.reason or "refused")

    def _forget(self, assoc: Any) -> str | None:
        """The id of an association whose release may finish series early: one that stored
        something (an echo-only one needs no check) and had nothing refused. After a refusal
        (a full disk, say) the sender re-sends; what it did get through may be a geometrically
        complete part of the series, so its series wait for the quiet period or the re-send."""
        with self._lock:
            aid = self._assoc_ids.pop(assoc, None)
            if aid is None:
                return None
            stored, refused = aid in self._stored, aid in self._refused
            self._stored.discard(aid)
            self._refused.discard(aid)
        if refused and stored:
            log.info("association ended after refusals: its series wait for the quiet period")
        return aid if stored and not refused else None

    def _on_released(self, event: Any) -> None:
        aid = self._forget(event.assoc)
        if aid is None:
            return
        try:
            done = on_release(self.db, aid, self.settings)
            if done:
                log.info("association released: %d series complete", len(done))
        except SQLAlchemyError as exc:  # the database is away: the quiet period completes them
            log.warning("early-finish check failed (%s); the quiet period will complete the series",
                        type(exc).__name__)
        except Exception:  # the quiet period completes them instead
            log.exception("early-finish check failed")

    def _on_aborted(self, event: Any) -> None:
        self._forget(event.assoc)  # an abort is no signal of completeness

    # ------------------------------------------------------------------ run

    def start(self) -> _Server:
        """Listen in background threads; returns the server (``.server_address``)."""
        cfg = self.settings.receive
        server = self.ae.make_server((cfg.host, cfg.port), ae_title=cfg.ae_title,
                                     ssl_context=_ssl_context(cfg), evt_handlers=self.handlers,
                                     server_class=_Server)
        assert isinstance(server, _Server)
        server.allowed = tuple(ip_network(n, strict=False) for n in cfg.allowed_networks)
        self.ae._servers.append(server)  # as AE.start_server does: AE.shutdown() stops it
        threading.Thread(target=server.serve_forever, name="scp", daemon=True).start()
        self._server = server
        log.info("storage SCP %s listening on %s:%d", cfg.ae_title, *server.server_address[:2])
        return server

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self.ae.shutdown()  # stops the server and aborts open associations
        self._server = None


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    if code == OUT_OF_RESOURCES:
        log.warning("answering 0xA700: %s", comment)
    return ds
