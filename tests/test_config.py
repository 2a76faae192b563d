"""Configuration: defaults, TOML, TRIAGE_* variables, errors that name the setting; the node's CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodekit import echo_ok, free_port, wait_for
from typer.testing import CliRunner

from triage.cli import app
from triage.config import ConfigError, load_settings

runner = CliRunner()


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.receive.ae_title == "TRIAGE" and s.receive.port == 11112 and s.receive.max_pdu == 0
    assert s.executor.kind == "local" and s.assemble.quiet_seconds == 5.0 and s.storage.fsync
    assert s.database_url == f"sqlite:///{tmp_path / 'triage-data' / 'triage.db'}"
    assert s.blob_root == Path("triage-data") / "blobs"
    assert [r.kind for r in s.route.rules] == ["ignore", "cxr", "bct", "chestct"]


def test_toml_then_environment_then_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[receive]\nport = 104\nae_title = "NODE1"\nallowed_calling_aes = ["PACS1"]\n'
                   '[executor]\nkind = "celery"\n[models]\ncxr = "/models/cxr"\n')
    monkeypatch.setenv("TRIAGE_CONFIG", str(cfg))
    monkeypatch.setenv("TRIAGE_RECEIVE__PORT", "11113")
    monkeypatch.setenv("TRIAGE_RECEIVE__ALLOWED_NETWORKS", '["10.0.0.0/8"]')
    s = load_settings()
    assert (s.receive.port, s.receive.ae_title, s.receive.allowed_calling_aes) == (11113, "NODE1", ["PACS1"])
    assert s.receive.allowed_networks == ["10.0.0.0/8"] and s.executor.kind == "celery"
    assert s.models.cxr == Path("/models/cxr")
    assert load_settings(receive={"port": 2000}).receive.port == 2000


@pytest.mark.parametrize(("env", "value", "named"), [
    ("TRIAGE_RECEIVE__PORT", "abc", "receive.port (TRIAGE_RECEIVE__PORT)"),
    ("TRIAGE_RECEIVE__PORT", "70000", "receive.port (TRIAGE_RECEIVE__PORT)"),
    ("TRIAGE_RECEIVE__AE_TITLE", "A" * 17, "receive.ae_title (TRIAGE_RECEIVE__AE_TITLE)"),
    ("TRIAGE_RECEIVE__ALLOWED_NETWORKS", '["10.0.0.300/8"]',
     "receive.allowed_networks (TRIAGE_RECEIVE__ALLOWED_NETWORKS)"),
    ("TRIAGE_STORAGE__HIGH_WATER", "1.5", "storage.high_water (TRIAGE_STORAGE__HIGH_WATER)"),
    ("TRIAGE_EXECUTOR__KIND", "threads", "executor.kind (TRIAGE_EXECUTOR__KIND)"),
    ("TRIAGE_CELERY__BROKER_URL", "amqp://x", "celery.broker_url (TRIAGE_CELERY__BROKER_URL)"),
])
def test_bad_values_name_the_setting_and_its_variable(monkeypatch: pytest.MonkeyPatch, env: str,
                                                      value: str, named: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=r"invalid configuration") as err:
        load_settings()
    assert named in str(err.value)


def test_unknown_setting_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[receive]\nportt = 104\n")
    with pytest.raises(ConfigError, match=r"receive\.portt \(TRIAGE_RECEIVE__PORTT\): Extra inputs"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "nope.toml")
    cfg.write_text("[receive\nport = 1\n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(cfg)


def test_cli_db_upgrade_and_current(tmp_path: Path) -> None:
    env = {"TRIAGE_NODE__DATA_DIR": str(tmp_path / "d")}
    res = runner.invoke(app, ["db", "current"], env=env)
    assert res.exit_code == 1 and "run `triage db upgrade`" in res.output
    from alembic.script import ScriptDirectory

    from storage.migrate import MIGRATIONS

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    res = runner.invoke(app, ["db", "upgrade"], env=env)
    assert res.exit_code == 0 and f"empty -> {head}" in res.output
    res = runner.invoke(app, ["db", "current"], env=env)
    assert res.exit_code == 0 and f"current {head}, head {head}" in res.output
    res = runner.invoke(app, ["serve"], env={"TRIAGE_RECEIVE__PORT": "-1"})
    assert res.exit_code == 2 and "receive.port (TRIAGE_RECEIVE__PORT)" in res.output


def test_triage_serve_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
                   f'[receive]\nport = {port}\nae_title = "NODE1"\n')
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "triage.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        wait_for(lambda: echo_ok(port, "NODE1"), 60, "triage serve to answer C-ECHO", interval=0.5)
        assert (tmp_path / "data" / "scp.pid").is_file() and (tmp_path / "data" / "triage.db").is_file()
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t < 30
        assert not (tmp_path / "data" / "scp.pid").exists()
        assert not echo_ok(port, "NODE1")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "triage node up" in text and "SCP process" in text


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from triage/config.py; regenerate it after a change:
    `python -m triage.configdoc > docs/configuration.md`."""
    from triage.configdoc import reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    text = doc.read_text()
    assert text == reference(), ("docs/configuration.md is out of date; regenerate it with "
                                 "`python -m triage.configdoc > docs/configuration.md`")
    # every setting is there, with its environment variable
    for name in ("receive.max_pdu", "notify.webhooks", "executor.heartbeat_seconds",
                 "rank.urgent_percentile"):
        env = "TRIAGE_" + name.upper().replace(".", "__")
        assert f"`{name}`" in text and f"`{env}`" in text
