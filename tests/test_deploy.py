"""Static checks of the deployment files against the code: no Docker, no network.

compose.yaml, the Dockerfile, Prometheus' config and rules, Grafana's provisioning and
dashboard, and ops/RUNBOOK.md must agree with what the code really has: CLI commands and
their options (walked in the typer app's click tree), settings (the pydantic models'
fields), stage names (``processors.topology.STAGES``) and metric names (read from
``StreamMetrics`` and the exporter's collector, never from a list kept here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from ops import cli
from ops.exporter import PipelineCollector
from processors.config import AppSettings
from processors.topology import STAGES
from streams.metrics import StreamMetrics
from streams.settings import ENV_PREFIX, StreamSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "ops" / "deploy"
RUNBOOK = ROOT / "ops" / "RUNBOOK.md"
SETTING_FIELDS = set(StreamSettings.model_fields) | set(AppSettings.model_fields)
METRIC_RE = re.compile(r"\btrackstream_[a-z_]+")
ENV_RE = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9_]+")
INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


# ---------------------------------------------------------------------------- helpers
def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def interpolate(value: str) -> str:
    """A compose value as Compose sees it with no variables set: ``${X:-d}`` -> ``d``."""
    return INTERPOLATION_RE.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def is_group(command: Any) -> bool:
    return hasattr(command, "get_command") and hasattr(command, "list_commands")


def resolve(args: list[str]) -> tuple[list[str], Any, Any, list[str]]:
    """Walk the CLI's click command tree (``typer.main.get_command``): the command path,
    the leaf command, its parent context and the arguments left for it.

    Raises LookupError naming the first word that is not a command.
    """
    command: Any = typer.main.get_command(cli.app)
    ctx = command.context_class(command, info_name="trackstream")
    path: list[str] = []
    rest = list(args)
    while is_group(command):
        if not rest or rest[0].startswith("-"):
            raise LookupError(f"`trackstream {' '.join(args)}`: no command after {path or 'it'}")
        name, *rest = rest
        sub = command.get_command(ctx, name)
        if sub is None:
            known = ", ".join(command.list_commands(ctx))
            raise LookupError(f"`trackstream {' '.join(args)}`: no command {name!r} ({known})")
        path.append(name)
        command = sub
        if is_group(command):
            ctx = command.context_class(command, info_name=name, parent=ctx)
    return path, command, ctx, rest


def parse_cli(args: list[str]) -> list[str]:
    """The command path of ``trackstream ARGS``, after parsing its arguments and options
    exactly as the CLI would (types, ranges and parameter callbacks included)."""
    path, command, parent, rest = resolve(args)
    try:
        command.make_context(path[-1], rest, parent=parent)
    except Exception as exc:  # click's UsageError/BadParameter (typer vendors click)
        if not hasattr(exc, "format_message"):
            raise
        pytest.fail(f"`trackstream {' '.join(args)}` does not parse: {exc.format_message()}")
    return path


def sample_names(family: Metric) -> set[str]:
    """The sample names a metric family is exposed with (Prometheus text format)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }.get(family.type, ("",))
    return {family.name + suffix for suffix in suffixes}


def exported_metrics() -> set[str]:
    """Every sample name the code exports: worker metrics and the exporter's."""
    registry = CollectorRegistry()
    StreamMetrics(registry)
    families = list(registry.collect())
    collector = PipelineCollector(StreamSettings.build(), database_url=None)
    try:
        families += collector.describe()
    finally:
        collector.close()
    return {name for family in families for name in sample_names(family)}


def metrics_in(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.+?)\s*#*$", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a JSON document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "compose.yaml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def app_image(compose: dict[str, Any]) -> str:
    return str(compose["x-trackstream"]["image"])


@pytest.fixture(scope="module")
def app_services(services: dict[str, Any], app_image: str) -> dict[str, dict[str, Any]]:
    """The services running the trackstream image."""
    found = {name: s for name, s in services.items() if s.get("image") == app_image}
    assert found, f"no service runs {app_image}"
    return found


@pytest.fixture(scope="module")
def commands(app_services: dict[str, Any]) -> dict[str, list[str]]:
    """Service name -> command path (``["worker"]``, ``["db", "upgrade"]``, ...)."""
    return {name: resolve(s["command"])[0] for name, s in app_services.items()}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metrics()


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(DEPLOY / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/trackstream.json").read_text())
    return doc


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: repository path (relative, no ./) -> container path."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            out[source.removeprefix("./")] = target
    return out


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(str(p)) for p in service.get("expose", [])}
    ports |= {int(interpolate(str(p)).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
    return ports


def env_of(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping"
    return env


def depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


# ------------------------------------------------------------------ compose: the app
def test_every_app_service_runs_a_real_cli_command(app_services: dict[str, Any]) -> None:
    ran = {" ".join(parse_cli(service["command"])) for service in app_services.values()}
    for needed in ("db upgrade", "scheduler", "worker", "reconcile", "exporter", "dashboard"):
        assert needed in ran, f"no service runs `trackstream {needed}`"


def test_app_services_share_the_image_and_environment(
    compose: dict[str, Any], app_services: dict[str, Any]
) -> None:
    shared = compose["x-trackstream-env"]
    assert compose["x-trackstream"]["build"]["context"] == "."
    assert (ROOT / compose["x-trackstream"]["build"]["dockerfile"]).is_file()
    for name, service in app_services.items():
        env = env_of(service)
        missing = {k for k, v in shared.items() if k not in env or env[k] != v}
        assert not missing, f"{name} does not carry the shared environment: {missing}"


def test_one_scalable_service_per_stage(
    services: dict[str, Any], app_services: dict[str, Any]
) -> None:
    stage_services = {name: s for name, s in app_services.items() if s["command"][0] == "worker"}
    assert {s["command"][1] for s in stage_services.values()} == set(STAGES)
    for name, service in stage_services.items():
        stage = service["command"][1]
        assert name == stage, f"the {stage} stage should be the service {stage!r}, not {name!r}"
        # `docker compose up --scale STAGE=N` needs N distinct containers and consumers
        for key in ("container_name", "ports", "hostname"):
            assert key not in service, f"{name}: {key} prevents --scale"
        assert "--consumer" not in service["command"], f"{name}: one consumer name for all"
        env = env_of(service)
        assert env.get(f"{ENV_PREFIX}METRICS_PORT"), f"{name} serves no metrics"
        assert int(env[f"{ENV_PREFIX}METRICS_PORT"] or 0) in container_ports(service)
        # the default, 127.0.0.1, is unreachable from the Prometheus container
        assert env.get(f"{ENV_PREFIX}METRICS_HOST") == "0.0.0.0", f"{name}: metrics unreachable"
    assert set(STAGES) <= set(services)


def test_stop_grace_outlasts_the_shutdown_grace(app_services: dict[str, Any]) -> None:
    default_ms = StreamSettings.model_fields["shutdown_grace_ms"].default
    for name, service in app_services.items():
        if service.get("restart") == "no":
            continue
        grace_ms = env_of(service).get(f"{ENV_PREFIX}SHUTDOWN_GRACE_MS") or default_ms
        grace_s = int(interpolate(str(grace_ms))) / 1000
        stop_s = duration_s(service.get("stop_grace_period", "10s"))
        assert stop_s > grace_s, f"{name} is killed before it can hand its work back"


def test_workers_wait_for_redis_and_the_migration(
    services: dict[str, Any], app_services: dict[str, Any], commands: dict[str, list[str]]
) -> None:
    (migrate,) = (name for name, path in commands.items() if path == ["db", "upgrade"])
    assert services[migrate]["restart"] == "no"
    assert depends(services[migrate]) == {"postgres": "service_healthy"}
    for name, service in app_services.items():
        if name == migrate:
            continue
        deps = depends(service)
        assert deps.get(migrate) == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
    for name in ("redis", "postgres"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_compose_env_vars_are_real_settings() -> None:
    text = (ROOT / "compose.yaml").read_text()
    names = set(ENV_RE.findall(text))
    assert names
    unknown = sorted(n for n in names if n.removeprefix(ENV_PREFIX).lower() not in SETTING_FIELDS)
    assert not unknown, f"compose.yaml sets variables no setting reads: {unknown}"


def test_compose_environment_makes_valid_settings(
    app_services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for name, service in app_services.items():
        values = {
            key.removeprefix(ENV_PREFIX).lower(): interpolate(str(value))
            for key, value in env_of(service).items()
            if key.startswith(ENV_PREFIX) and value is not None
        }
        StreamSettings.build(
            **{k: v for k, v in values.items() if k in StreamSettings.model_fields}
        )
        app = AppSettings.build(
            **{k: v for k, v in values.items() if k in AppSettings.model_fields}
        )
        assert app.database_url.startswith("postgresql+psycopg://"), name
        assert urlsplit(app.database_url).hostname == "postgres", name


def test_redis_urls_name_compose_services(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    env = compose["x-trackstream-env"]
    url = env[f"{ENV_PREFIX}REDIS_URL"]
    assert INTERPOLATION_RE.fullmatch(url), "the Redis URL must be overridable (cluster)"
    assert urlsplit(interpolate(url)).hostname in services
    cluster = env[f"{ENV_PREFIX}REDIS_CLUSTER"]
    assert INTERPOLATION_RE.fullmatch(cluster), "TRACKSTREAM_REDIS_CLUSTER must be overridable"
    assert interpolate(cluster) == "false"


def test_served_ports_listen_on_all_interfaces(app_services: dict[str, Any]) -> None:
    """Exporter and dashboard default to 127.0.0.1: unreachable from other containers."""
    for name, service in app_services.items():
        command = service["command"]
        if "--port" in command:
            assert command[command.index("--host") + 1] == "0.0.0.0", name
            assert int(command[command.index("--port") + 1]) in container_ports(service), name


def test_dashboard_token_comes_from_the_environment(
    app_services: dict[str, Any], commands: dict[str, list[str]]
) -> None:
    (name,) = (n for n, path in commands.items() if path == ["dashboard"])
    token = env_of(app_services[name])[f"{ENV_PREFIX}DASHBOARD_TOKEN"]
    assert token is None or INTERPOLATION_RE.fullmatch(token), "no literal token in compose.yaml"


# -------------------------------------------------------------- compose: the servers
def test_redis_runs_with_aof(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    conf_target = mounts(redis)["ops/deploy/redis.conf"]
    assert conf_target in redis["command"]
    conf = dict(
        line.split(None, 1)
        for line in (DEPLOY / "redis.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction", "an evicted stream is lost work"
    assert any(v.split(":")[1] == conf["dir"] for v in redis["volumes"]), "AOF not on a volume"


def test_cluster_profile_makes_three_masters(services: dict[str, Any]) -> None:
    in_profile = {n: s for n, s in services.items() if "cluster" in s.get("profiles", [])}
    nodes = {
        n: s
        for n, s in in_profile.items()
        if "--cluster-enabled" in s.get("command", [])
        and s["command"][s["command"].index("--cluster-enabled") + 1] == "yes"
    }
    assert len(nodes) >= 3
    for name, node in nodes.items():
        assert "ops/deploy/redis.conf" in mounts(node), f"{name} runs without the AOF config"
        assert "healthcheck" in node, name
    (init,) = (s for n, s in in_profile.items() if n not in nodes)
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "--cluster create" in script and "--cluster-yes" in script
    assert "--cluster-replicas 0" in script
    for name in nodes:
        assert name in script, f"cluster-init leaves out {name}"
    assert depends(init) == dict.fromkeys(nodes, "service_healthy")
    assert init.get("restart") == "no"
    # nothing outside the profile may depend on it (a disabled service breaks `up`)
    for name, service in services.items():
        if name not in in_profile:
            assert not set(depends(service)) & set(in_profile), name


def test_postgres_has_a_healthcheck_and_a_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:15")
    volume = next(v for v in pg["volumes"] if v.endswith(":/var/lib/postgresql/data"))
    assert volume.split(":")[0] in compose["volumes"]
    url = urlsplit(interpolate(compose["x-trackstream-env"][f"{ENV_PREFIX}DATABASE_URL"]))
    assert url.scheme == "postgresql+psycopg"
    assert url.username == pg["environment"]["POSTGRES_USER"]
    assert url.password == interpolate(pg["environment"]["POSTGRES_PASSWORD"])
    assert url.path.lstrip("/") == pg["environment"]["POSTGRES_DB"]


# ---------------------------------------------------------------------- Prometheus
def test_prometheus_config_matches_compose(
    services: dict[str, Any], app_services: dict[str, Any]
) -> None:
    prometheus = services["prometheus"]
    mounted = mounts(prometheus)
    assert mounted["ops/deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = load_yaml(DEPLOY / "prometheus.yml")
    assert config["rule_files"] == [mounted["ops/deploy/alerts.yml"]]
    scraped: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                service = "prometheus" if host == "localhost" else host
                assert service in services, f"{job['job_name']}: {host} is no compose service"
                assert int(port) in container_ports(services[service]), target
                scraped.add(service)
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                assert host in app_services, f"{job['job_name']}: {host} is no app service"
                port = int(env_of(app_services[host])[f"{ENV_PREFIX}METRICS_PORT"] or 0)
                assert sd["port"] == port, f"{host} serves metrics on {port}"
                scraped.add(host)
    assert "exporter" in scraped
    assert set(STAGES) <= scraped, "every stage's workers (all replicas) are scraped"


def test_alerts_are_complete(alert_rules: list[dict[str, Any]]) -> None:
    names = {rule["alert"] for rule in alert_rules}
    for needed in (
        "StageLagHigh",
        "OldestPendingTooOld",
        "DeadLettersGrowing",
        "StageHasNoConsumers",
        "TrackerStale",
        "ExporterDown",
        "ScrapeErrors",
    ):
        assert needed in names
    for rule in alert_rules:
        assert "for" in rule, rule["alert"]
        duration_s(rule["for"])
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key), f"{rule['alert']} has no {key}"
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    stale = next(r for r in alert_rules if r["alert"] == "TrackerStale")
    assert "trackstream_stalest_tracker_age_seconds > 43200" in stale["expr"]


def test_alerts_use_exported_metrics(alert_rules: list[dict[str, Any]], exported: set[str]) -> None:
    for rule in alert_rules:
        unknown = metrics_in(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} uses metrics nobody exports: {unknown}"
    used = {m for rule in alert_rules for m in metrics_in(rule["expr"])}
    assert "trackstream_dead_letters" in used and "trackstream_stream_live_consumers" in used


def test_alert_runbooks_link_to_runbook_sections(alert_rules: list[dict[str, Any]]) -> None:
    anchors = heading_anchors(RUNBOOK.read_text())
    for rule in alert_rules:
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (ROOT / path).resolve() == RUNBOOK, rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in RUNBOOK.md"


# ------------------------------------------------------------------------- Grafana
def test_grafana_is_provisioned_from_the_repository(services: dict[str, Any]) -> None:
    mounted = mounts(services["grafana"])
    assert mounted["ops/deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [mounted["ops/deploy/grafana/dashboards"]]
    (source,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/datasource.yml")["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus"
    assert url.hostname == "prometheus"
    assert url.port in container_ports(services["prometheus"])


def test_dashboard_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (source,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/datasource.yml")["datasources"]
    refs = [d["datasource"] for d in walk(dashboard) if isinstance(d.get("datasource"), dict)]
    prometheus_refs = [r for r in refs if r.get("type") == "prometheus"]
    assert prometheus_refs
    assert {r["uid"] for r in prometheus_refs} == {source["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_uses_exported_metrics(dashboard: dict[str, Any], exported: set[str]) -> None:
    exprs = [d["expr"] for d in walk(dashboard) if isinstance(d.get("expr"), str)]
    exprs += [d["query"] for d in walk(dashboard) if isinstance(d.get("query"), str)]
    used = {m for expr in exprs for m in metrics_in(expr)}
    assert not used - exported, f"the dashboard uses metrics nobody exports: {used - exported}"
    for needed in (
        "trackstream_stream_lag",
        "trackstream_stream_pending",
        "trackstream_stream_oldest_pending_age_seconds",
        "trackstream_messages_processed_total",
        "trackstream_dead_letters",
        "trackstream_stream_live_consumers",
        "trackstream_handle_duration_seconds_bucket",
        "trackstream_stalest_tracker_age_seconds",
    ):
        assert needed in used, f"no panel shows {needed}"
    assert any("histogram_quantile(0.95" in e for e in exprs)


# ------------------------------------------------------------------------- Dockerfile
def test_dockerfile_installs_the_project_and_runs_the_cli() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    (entrypoint,) = (line for line in lines if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT")) == ["trackstream"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "trackstream" in pyproject["project"]["scripts"]
    assert any(re.fullmatch(r"RUN pip install (--no-cache-dir )?\.( .*)?", x) for x in lines)

    copied = {src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]}
    ignored = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert not any(fnmatch(src, pattern) for pattern in ignored), f"{src} is .dockerignored"
    # every package setuptools installs is in the image
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch(p.name, pat) for pat in patterns)
    }
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    assert pyproject["project"]["readme"] in copied


# --------------------------------------------------------------------------- runbook
def runbook_shell() -> tuple[list[list[str]], list[list[str]]]:
    """Shell commands in the runbook as words: (code block lines, inline code spans).

    Leading ``VAR=value`` assignments are dropped; a pipe, ``&&``, ``;`` or a comment
    ends the command.
    """
    text = RUNBOOK.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))

    def words(line: str) -> list[str]:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            return []
        stop = next((i for i, w in enumerate(tokens) if w in ("|", "&&", ";", ">")), None)
        tokens = tokens[:stop]
        while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
            tokens = tokens[1:]
        return tokens

    return [w for w in map(words, lines) if w], [w for w in map(words, inline) if w]


def compose_calls(commands: list[list[str]]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``docker compose SUB ...`` as (SUB, services named, CLI args of ``run``)."""
    with_value = {"--profile", "--scale", "--tail", "-e", "--env", "-u", "--user"}
    for words in commands:
        if words[:2] != ["docker", "compose"]:
            continue
        rest, named, sub = words[2:], [], ""
        while rest:
            word, *rest = rest
            if word in with_value and rest:
                value, *rest = rest
                if word == "--scale":
                    named.append(value.split("=", 1)[0])
            elif word.startswith("--scale="):
                named.append(word.removeprefix("--scale=").split("=", 1)[0])
            elif word.startswith("-"):
                continue
            elif not sub:
                sub = word
            else:
                named.append(word)
                if sub in ("run", "exec"):
                    yield sub, named, rest
                    break
        else:
            yield sub, named, []


def test_runbook_commands_exist(services: dict[str, Any], app_services: dict[str, Any]) -> None:
    examples, mentioned = runbook_shell()
    cli_examples = [w[1:] for w in examples if w[0] == "trackstream"]
    assert cli_examples
    for args in cli_examples:
        parse_cli(args)  # examples must run as written: options and values too
    for words in mentioned:
        if words[0] == "trackstream" and len(words) > 1:
            resolve(words[1:])  # inline mentions may carry placeholders (STAGE, N)
    calls = list(compose_calls(examples + mentioned))
    assert any(sub == "up" and set(named) & set(STAGES) for sub, named, _ in calls)
    for sub, named, args in calls:
        for name in named:
            assert name in services, f"`docker compose {sub}`: no service {name!r}"
        if sub == "run" and args:
            assert named[-1] in app_services, f"`docker compose run {named[-1]}`: not the app"
            parse_cli(args)


def test_runbook_settings_are_real() -> None:
    names = set(ENV_RE.findall(RUNBOOK.read_text()))
    unknown = sorted(n for n in names if n.removeprefix(ENV_PREFIX).lower() not in SETTING_FIELDS)
    assert not unknown, f"RUNBOOK.md names variables no setting reads: {unknown}"


def test_runbook_internal_links_resolve() -> None:
    text = RUNBOOK.read_text()
    anchors = heading_anchors(text)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"RUNBOOK.md links to a missing section #{anchor}"
    for target in re.findall(r"\]\((\.{0,2}/?[^)#:]+)(?:#[^)]*)?\)", text):
        assert (RUNBOOK.parent / target).exists(), f"RUNBOOK.md links to a missing {target}"
