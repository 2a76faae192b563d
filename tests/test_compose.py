"""compose.yaml and the Dockerfile, checked without Docker (it cannot run on these machines).

The compose file must parse; every service built from our image must run a real ``triage``
subcommand with options that subcommand accepts; every TRIAGE_* variable must name a
setting, and the node's environment must load as a valid configuration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel

from triage.cli import app
from triage.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
INTERPOLATION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(doc, dict) and doc["services"]
    return doc


def _ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("triage-node")}


def _env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    return INTERPOLATION.sub(lambda m: env.get(m.group(1), "x"), value)


def test_compose_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "node", "worker-gpu", "worker-io", "flower",
            "orthanc"} <= set(services)
    redis = " ".join(services["redis"]["command"].split())
    assert "--maxmemory-policy noeviction" in redis and "--appendonly yes" in redis
    assert "--requirepass" in redis
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # CUDA torch where the GPU is used (a CPU wheel there would fail every job)
    assert "cu" in services["worker-gpu"]["build"]["args"]["TORCH_INDEX"]
    assert services["worker-gpu"]["environment"]["TRIAGE_MODELS__DEVICE"] == "cuda"
    for name, svc in _ours(compose).items():
        # whoever builds reports (node, io workers) plans deliveries: all must know the PACS
        assert "TRIAGE_DISPATCH__DESTINATIONS" in svc["environment"], name
        assert svc.get("user") and not str(svc["user"]).startswith("0"), f"{name} must not run as root"
        assert ".env" in svc.get("env_file", []), name
    for name in ("postgres", "redis", "node", "worker-gpu", "worker-io", "flower"):
        assert "test" in services[name]["healthcheck"], f"{name} has no health check"
    assert set(compose["volumes"]) >= {"pgdata", "redisdata", "blobs"}
    # every ${VAR} the file needs is in .env.example (compose refuses to start without them)
    needed = set(INTERPOLATION.findall((ROOT / "compose.yaml").read_text()))
    assert needed <= set(_env_example()), needed - set(_env_example())


def test_every_command_is_a_real_subcommand(compose: dict[str, Any]) -> None:
    root = typer.main.get_command(app)
    for name, svc in _ours(compose).items():
        argv = list(svc["command"])
        assert argv[0] == "triage", f"{name}: {argv}"
        cmd: Any = root
        args = argv[1:]
        while hasattr(cmd, "commands"):  # a group: descend into the named subcommand
            sub = cmd.commands.get(args[0]) if args else None
            assert sub is not None, f"{name}: `{' '.join(argv)}` is not a triage subcommand"
            cmd, args = sub, args[1:]
        # the options parse as the subcommand defines them (no unknown option, no bad value)
        cmd.make_context(" ".join(argv[:2]), list(args), resilient_parsing=False)


def _setting_exists(path: list[str]) -> bool:
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return i == len(path) - 1
    return False


def test_environment_names_real_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    env = _env_example()
    for name, svc in _ours(compose).items():
        variables = {k: _interpolate(str(v), env) for k, v in svc["environment"].items()}
        for var in variables:
            assert var.startswith("TRIAGE_"), f"{name}: {var}"
            path = var.removeprefix("TRIAGE_").lower().split("__")
            assert _setting_exists(path), f"{name}: {var} is not a setting (triage/config.py)"
        for var in [v for v in os.environ if v.startswith("TRIAGE_")]:
            monkeypatch.delenv(var)
        for k, v in variables.items():
            monkeypatch.setenv(k, v.replace("/data", str(tmp_path)) if k == "TRIAGE_NODE__DATA_DIR" else v)
        s = load_settings()
        assert s.executor.kind == "celery" and s.storage.database_url.startswith("postgresql://")
        if name == "node":
            assert s.web.host == "0.0.0.0" and s.dispatch.destinations[0].ae_title == "ORTHANC"
            assert s.receive.port == 11112


def test_dockerfile_runs_as_non_root_and_installs_cpu_torch_first() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    torch_at = next(i for i, ln in enumerate(lines) if "torch==" in ln)
    project_at = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install ."))
    assert torch_at < project_at, "torch must come from the chosen index before the project pulls it"
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))
    for d in ("flows", "storage", "triage", "worker"):
        assert any(ln.startswith(f"COPY {d} ") for ln in lines), d
