"""The demo's command line and its options agree on the defaults."""

from __future__ import annotations

import inspect

from triage.cli import demo
from triage.demo import DEFAULT_COUNTS, DemoOptions


def test_cli_defaults_are_the_demo_options() -> None:
    params = inspect.signature(demo).parameters
    assert {k: params[k].default for k in DEFAULT_COUNTS} == DEFAULT_COUNTS == DemoOptions().counts
    assert params["seed"].default == DemoOptions().seed
