"""Modality facts shared by the receive path and imaging (no heavy imports here)."""

PROJECTION_MODALITIES = frozenset({"DX", "CR", "MG", "RF", "XA", "IO", "PX", "RG"})
"""Modalities read as single 2D projection images rather than as volumes."""
