"""docker-compose.yml cannot run here (no Docker engine): check what can be checked without one."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

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
