"""How the node identifies itself in DICOM: implementation class UID and version name.

The same pair goes into the File Meta header of every instance the node stores and into
every association it requests or accepts (A-ASSOCIATE user information), so a PACS log or a
network trace shows this software, not the network library it is built on.
"""

from __future__ import annotations

from pynetdicom import AE

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION", "node_ae"]

IMPLEMENTATION_CLASS_UID = "2.25.146604656537092428881302855852267684218"  # uuid5(URL, the project)
IMPLEMENTATION_VERSION = "TRIAGE_NODE_1"


def node_ae(ae_title: str) -> AE:
    """A pynetdicom application entity carrying the node's implementation identifiers."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION
    return ae
