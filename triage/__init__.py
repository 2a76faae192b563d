"""The triage node: receive, assemble, route, analyse, report, dispatch, rank, web."""

MANUFACTURER = "triage-node"
"""Manufacturer written into this node's own outputs; routing ignores series that carry it."""
