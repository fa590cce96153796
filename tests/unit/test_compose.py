"""docker-compose.yml cannot run here (no Docker engine): check what can be checked without one, including a load
by compose-go, the library `docker compose` itself uses (deploy/compose-check)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stream_app.cli import main
from stream_app.kafka_local import kafka_version
from stream_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = [name for name, svc in SERVICES.items() if "build" in svc]


def _command(svc: dict) -> list[str]:
    """Compose accepts a command as a list or as one shell-style string."""
    command = svc["command"]
    return shlex.split(command) if isinstance(command, str) else command


def _env(svc: dict) -> dict[str, str]:
    """Compose accepts environment as a mapping or as a list of NAME=value."""
    env = svc.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else env


def test_compose_parses_with_the_expected_services():
    assert {"kafka", "topics", "worker", "prometheus"} <= set(SERVICES)
    assert set(APP_SERVICES) == {"topics", "worker"}


def test_kafka_image_matches_the_pinned_broker_version():
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{kafka_version()}"


def test_build_files_and_mounted_files_exist():
    for svc in SERVICES.values():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for vol in svc.get("volumes", []):
            host = vol.split(":", 1)[0]
            if host.startswith("."):
                assert (ROOT / host).exists(), host


def test_dockerfile_copies_existing_sources():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copies = [
        [w for w in line.split() if not w.startswith("--")] for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
    ]
    sources = [src for words in copies for src in words[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src


def test_app_services_run_real_cli_commands():
    assert APP_SERVICES
    for name in APP_SERVICES:
        command = _command(SERVICES[name])
        assert command[0] == "stream-app", name
        assert command[1] in main.commands, f"{name}: no such subcommand {command[1]!r}"


def test_env_names_are_settings_fields():
    fields = set(Settings.model_fields)
    for name in APP_SERVICES:
        env = _env(SERVICES[name])
        for var in env:
            assert var.startswith("STREAM_APP_"), var
            assert var.removeprefix("STREAM_APP_").lower() in fields, var
        Settings(**{k.removeprefix("STREAM_APP_").lower(): v for k, v in env.items()})  # values validate too


def test_worker_port_is_published_and_scraped():
    worker = SERVICES["worker"]
    port = _env(worker)["STREAM_APP_WEB_PORT"]
    assert f"127.0.0.1:{port}:{port}" in worker["ports"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"worker:{port}"]


def test_published_ports_bind_loopback_only():
    for svc in SERVICES.values():
        for mapping in svc.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), mapping


@pytest.fixture(scope="module")
def compose_check(tmp_path_factory) -> Path:
    """deploy/compose-check built with Go: compose-go, the library `docker compose` loads files with (schema
    validation, interpolation, normalisation, reference checks), without a Docker engine. `docker compose
    config` itself needs the compose CLI plugin, which the Docker client of this machine kind lacks."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs Go to build deploy/compose-check (compose-go from the Go module proxy)")
    out = tmp_path_factory.mktemp("bin") / "compose-check"
    built = subprocess.run([go, "build", "-o", str(out), "."], cwd=ROOT / "deploy" / "compose-check",
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert built.returncode == 0, built.stderr
    return out


def _load(compose_check: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_check), str(path)], capture_output=True, text=True, timeout=60)


def test_compose_file_loads_as_docker_compose_loads_it(compose_check):
    out = _load(compose_check, ROOT / "docker-compose.yml")
    assert out.returncode == 0, out.stderr
    model = yaml.safe_load(out.stdout)
    services = model["services"]
    assert set(services) == set(SERVICES)
    assert services["worker"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["worker"]["healthcheck"]["test"][0] == "CMD"
    assert services["worker"]["stop_grace_period"] == "45s"
    mounts = [v for svc in services.values() for v in svc.get("volumes", [])]
    assert {m["type"] for m in mounts} == {"bind"} and all(m["read_only"] for m in mounts)
    for m in mounts:
        assert (ROOT / m["source"]).exists(), m["source"]
    assert (ROOT / "deploy/grafana/dashboards/stream_app.json").is_file()


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("    healthcheck:  # the image", "    healthchek:  # the image", "healthchek"),
        ("depends_on: [worker]", "depends_on: [workr]", 'undefined service "workr"'),
        ("      retries: 30", "      retries: lots", "retries"),
        ('      - "127.0.0.1:6066:6066"', '      - "127.0.0.1:6066:6066:1"', "Invalid ip address"),
    ],
)
def test_compose_check_rejects_what_compose_rejects(compose_check, tmp_path, old, new, error):
    text = (ROOT / "docker-compose.yml").read_text()
    assert old in text
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace(old, new))
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")  # the same relative paths as the real file
    out = _load(compose_check, bad)
    assert out.returncode == 1 and error in out.stderr, out.stderr
