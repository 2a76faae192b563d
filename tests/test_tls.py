"""The storage SCP with TLS and client certificates (``receive.tls``).

A throwaway PKI is made with the ``openssl`` command line: a CA, a server certificate for
127.0.0.1 / localhost and a client certificate signed by it, and a second, unrelated CA with
a client certificate of its own. Only clients holding a certificate of the configured
``client_ca`` may associate; the others (no certificate, the other CA, plain TCP) are
closed during the handshake and the node keeps serving.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nodekit import require_tool
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from test_receive import ct_slice

from storage.db import Database
from storage.migrate import upgrade
from storage.models import Instance
from triage.config import Settings, load_settings
from triage.receive import StorageSCP

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA the node trusts for clients (and that signed the server certificate)
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by ``ca``
    client_key: Path
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by ``other_ca``
    other_client_key: Path


def _openssl(exe: str, *args: str | Path) -> None:
    res = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args[:2]))} failed: {res.stderr[-2000:]}")


def _make_ca(exe: str, cnf: Path, d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    _openssl(exe, "req", "-x509", "-config", cnf, "-extensions", "ca", "-newkey", "rsa:2048", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=Triage test {name}")
    return cert, key


def _make_leaf(exe: str, cnf: Path, d: Path, name: str, cn: str, ext: str, ca: tuple[Path, Path],
               serial: int) -> tuple[Path, Path]:
    cert, key, csr = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr"
    _openssl(exe, "req", "-new", "-config", cnf, "-newkey", "rsa:2048", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={cn}")
    _openssl(exe, "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(serial),
             "-days", "2", "-out", cert, "-extfile", cnf, "-extensions", ext)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    exe = require_tool("openssl", "openssl")
    d = tmp_path_factory.mktemp("pki")
    cnf = d / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF)
    ca = _make_ca(exe, cnf, d, "ca")
    server = _make_leaf(exe, cnf, d, "server", "127.0.0.1", "server", ca, 2)
    client = _make_leaf(exe, cnf, d, "client", "GOODPACS", "client", ca, 3)
    other = _make_ca(exe, cnf, d, "other-ca")
    other_client = _make_leaf(exe, cnf, d, "other-client", "EVILPACS", "client", other, 4)
    return PKI(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0],
               client_key=client[1], other_ca=other[0], other_client_cert=other_client[0],
               other_client_key=other_client[1])


@pytest.fixture()
def tls_scp(tmp_path: Path, pki: PKI) -> Iterator[tuple[StorageSCP, Settings]]:
    s = load_settings(node={"data_dir": str(tmp_path / "data")},
                      receive={"port": 0, "host": "127.0.0.1",
                               "tls": {"certificate": str(pki.server_cert), "key": str(pki.server_key),
                                       "client_ca": str(pki.ca)}})
    db = Database(s.database_url)
    upgrade(db)
    scp = StorageSCP(s, db)
    scp.start()
    try:
        yield scp, s
    finally:
        scp.stop()
        db.dispose()


def _client_context(pki: PKI, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts the node's CA and presents ``cert`` (if any)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _associate(port: int, ctx: ssl.SSLContext | None, hostname: str = "127.0.0.1",
               aet: str = "GOODPACS") -> Association:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    tls = (ctx, hostname) if ctx is not None else None
    return ae.associate("127.0.0.1", port, ae_title="TRIAGE", tls_args=tls)


def _echo(port: int, ctx: ssl.SSLContext, hostname: str = "127.0.0.1") -> int:
    assoc = _associate(port, ctx, hostname)
    assert assoc.is_established, "a client with a CA-signed certificate could not associate"
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """True when the association is not established (nothing could be sent over it)."""
    assoc = _associate(port, ctx)
    if assoc.is_established:  # pragma: no cover - the failure case
        assoc.release()
        return False
    return True


def test_tls_client_with_ca_signed_certificate_echoes_and_stores(tls_scp: tuple[StorageSCP, Settings],
                                                                  pki: PKI) -> None:
    scp, _ = tls_scp
    good = _client_context(pki, pki.client_cert, pki.client_key)
    # the server certificate carries both names; the client checks them
    assert _echo(scp.port, good, "127.0.0.1") == 0x0000
    assert _echo(scp.port, good, "localhost") == 0x0000

    ds = ct_slice(0, 1, series=generate_uid(), study=generate_uid())
    assoc = _associate(scp.port, good)
    assert assoc.is_established
    try:
        cipher = assoc.dul.socket.socket.cipher()  # type: ignore[union-attr]
        assert cipher is not None, "the association is not encrypted"
        status = assoc.send_c_store(ds)
        assert int(status.Status) == 0x0000, status
    finally:
        assoc.release()
    with scp.db.sessions() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
    assert row.calling_ae == "GOODPACS" and row.peer_address == "127.0.0.1"
    assert (scp.settings.blob_root / row.blob).is_file()


def test_tls_refuses_clients_without_a_trusted_certificate_and_keeps_serving(
        tls_scp: tuple[StorageSCP, Settings], pki: PKI) -> None:
    scp, _ = tls_scp
    port = scp.port
    good = _client_context(pki, pki.client_cert, pki.client_key)
    assert _echo(port, good) == 0x0000

    # (b) no client certificate at all; a certificate of an unrelated CA
    assert _refused(port, _client_context(pki)), "a client without a certificate associated"
    assert _refused(port, _client_context(pki, pki.other_client_cert, pki.other_client_key)), \
        "a client with a certificate of another CA associated"
    # (c) plain DICOM (no TLS) on the TLS port
    assert _refused(port, None), "a plain (non-TLS) client associated"
    # a client that does not trust the node's certificate gives up on its own
    distrust = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.other_ca))
    distrust.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    assert _refused(port, distrust), "a client associated with a server it does not trust"

    # (d) the node keeps serving, repeatedly
    for _ in range(3):
        assert _echo(port, good) == 0x0000
    ds = ct_slice(1, 1, series=generate_uid(), study=generate_uid())
    assoc = _associate(port, good)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    with scp.db.sessions() as s:
        assert len(s.scalars(select(Instance)).all()) == 1  # nothing from the refused clients


def _dcmtk_tls_supported(exe: str) -> bool:
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    return "+tls" in res.stdout + res.stderr


def test_tls_dcmtk_echoscu(tls_scp: tuple[StorageSCP, Settings], pki: PKI) -> None:
    exe = require_tool("echoscu", "dcmtk")
    if not _dcmtk_tls_supported(exe):
        pytest.fail("dcmtk's echoscu here is built without TLS (no +tls option); install the Debian "
                    "`dcmtk` package, which is built with OpenSSL", pytrace=False)
    scp, _ = tls_scp

    def echoscu(key: Path, cert: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, "-aet", "GOODPACS", "-aec", "TRIAGE", "-to", "10", "-ta", "10",
                               "+tls", str(key), str(cert), "+cf", str(pki.ca), "127.0.0.1",
                               str(scp.port)], capture_output=True, text=True, timeout=60)

    ok = echoscu(pki.client_key, pki.client_cert)
    assert ok.returncode == 0, ok.stderr
    bad = echoscu(pki.other_client_key, pki.other_client_cert)
    assert bad.returncode != 0, "echoscu with another CA's certificate succeeded"
    ok = echoscu(pki.client_key, pki.client_cert)
    assert ok.returncode == 0, ok.stderr


def test_tls_a_silent_connection_does_not_block_other_clients(tls_scp: tuple[StorageSCP, Settings],
                                                              pki: PKI) -> None:
    scp, _ = tls_scp
    good = _client_context(pki, pki.client_cert, pki.client_key)
    silent = socket.create_connection(("127.0.0.1", scp.port))  # connects, never says a word
    try:
        time.sleep(0.3)
        ae = AE(ae_title="GOODPACS")
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE", tls_args=(good, "127.0.0.1"))
        established = assoc.is_established
        if established:
            assoc.release()
        assert established, "a good client could not associate while another connection was silent"
    finally:
        silent.close()


def test_dispatch_delivers_over_tls_with_a_client_certificate(tls_scp: tuple[StorageSCP, Settings],
                                                              pki: PKI, tmp_path: Path) -> None:
    """The delivery outbox as a TLS client: our certificate for the PACS, its CA trusted."""
    from sqlalchemy import func, select
    from test_dispatch import _result

    from storage.blobs import BlobStore
    from storage.models import Instance, Result
    from triage.config import DispatchSettings
    from triage.dispatch import Sender, plan_deliveries

    scp, _ = tls_scp
    blobs = BlobStore(tmp_path / "out")

    def cfg(cert: Path, key_file: Path) -> DispatchSettings:
        return load_settings(dispatch={"timeout_seconds": 5, "destinations": [{
            "name": "pacs", "ae_title": "TRIAGE", "host": "127.0.0.1", "port": scp.port,
            "tls": {"certificate": str(cert), "key": str(key_file), "client_ca": str(pki.ca)}}]}).dispatch

    good = cfg(pki.client_cert, pki.client_key)
    r, outputs = _result(scp.db, blobs, n_objects=1)
    with scp.db.session() as s:
        assert plan_deliveries(s, s.get(Result, r.id), outputs, good) == 1  # type: ignore[arg-type]
    bad = Sender(scp.db, blobs, cfg(pki.other_client_cert, pki.other_client_key))
    assert bad.echo_all()["pacs"] is not None  # an untrusted client certificate is refused
    assert Sender(scp.db, blobs, good).echo_all() == {"pacs": None}
    assert Sender(scp.db, blobs, good).run_once() == {"dead": 0, "sent": 1, "failed": 0}
    with scp.db.sessions() as s:  # received and indexed by the TLS SCP
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
