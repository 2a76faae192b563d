"""Errors shared by the scoring modules."""


class ScoringError(RuntimeError):
    """A model produced a non-finite score."""
