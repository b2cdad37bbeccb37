"""docker-compose.yml only names commands, queues and settings that really exist.

No Docker engine is needed: the file is parsed and every entry point it uses is resolved
against the installed project, so a renamed queue, setting or CLI command breaks here
instead of in a container at deploy time.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from celery import Celery

from notifier.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NOTIFIER = str(Path(sys.executable).with_name("notifier"))
EXPECTED_SERVICES = {
    "postgres", "rabbitmq", "redis", "mailpit", "migrate", "worker-critical", "worker",
    "worker-deliver", "beat", "flower", "api",
}
INFRASTRUCTURE = {"postgres", "rabbitmq", "redis", "mailpit"}
CELERY_SUBCOMMANDS = {"worker", "beat", "flower"}
#: Read by compose itself (interpolation), not by notifier: no Settings field.
COMPOSE_ONLY_VARIABLES = {"NOTIFIER_FLOWER_BASIC_AUTH", "NOTIFIER_RABBITMQ_PASSWORD"}
#: Variables for a program other than notifier, per service.
FOREIGN_VARIABLES = {"flower": {"FLOWER_BASIC_AUTH"}}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in services.items() if name not in INFRASTRUCTURE}


def argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    variables = service.get("environment") or {}
    if isinstance(variables, list):
        variables = dict(item.split("=", 1) for item in variables)
    return {str(key): str(value) for key, value in variables.items()}


def celery_parts(args: list[str]) -> tuple[str, str, list[str]]:
    """(app module, sub-command, the sub-command's arguments) of ``celery -A app sub ...``."""
    assert args[0] == "celery" and args[1] in ("-A", "--app"), args
    return args[2], args[3], args[4:]


def option_names(args: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("-")]


def test_expected_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """The databases, the broker, a mail server, the migration job, three workers, beat
    and Flower."""
    assert set(services) == EXPECTED_SERVICES


def test_app_services_build_from_the_dockerfile(
    app_services: dict[str, dict[str, Any]],
) -> None:
    """Every app service builds the repository's Dockerfile, whose image runs as non-root."""
    for name, spec in app_services.items():
        build = spec["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                           "Dockerfile")
        assert (ROOT / context / dockerfile).is_file(), name
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


def test_celery_commands_use_the_notifier_app(
    app_services: dict[str, dict[str, Any]],
) -> None:
    """``celery -A notifier`` names an importable module whose ``app`` is a Celery app."""
    for name, spec in app_services.items():
        if argv(spec)[0] != "celery":
            continue
        module, _, _ = celery_parts(argv(spec))
        assert isinstance(importlib.import_module(module).app, Celery), name


def test_celery_subcommands_and_options_exist(
    app_services: dict[str, dict[str, Any]],
) -> None:
    """Each celery sub-command is worker/beat/flower and every option is one it accepts."""
    from celery.bin.celery import celery as celery_cli
    from flower.options import options as flower_options

    celery_commands = [spec for spec in app_services.values() if argv(spec)[0] == "celery"]
    assert {celery_parts(argv(spec))[1] for spec in celery_commands} == CELERY_SUBCOMMANDS
    for spec in celery_commands:
        _, sub, args = celery_parts(argv(spec))
        command = celery_cli.commands[sub]
        if sub == "flower":  # Flower's options are tornado options, passed through
            unknown = [o for o in option_names(args) if o.lstrip("-") not in flower_options]
        else:
            known = {opt for param in command.params for opt in param.opts}
            unknown = [o for o in option_names(args) if o not in known]
        assert not unknown, f"{sub}: unknown options {unknown}"


def test_worker_queues_are_configured_queues(
    app_services: dict[str, dict[str, Any]],
) -> None:
    """``-Q`` names only the app's queues, each consumed somewhere, in the app's order;
    critical ingest and delivery have a worker of their own."""
    import notifier

    configured = [queue.name for queue in notifier.app.conf.task_queues]
    consumed: dict[str, list[str]] = {}
    for name, spec in app_services.items():
        args = argv(spec)
        if args[0] != "celery" or celery_parts(args)[1] != "worker":
            continue
        queues = next((args[i + 1] for i, arg in enumerate(args) if arg in ("-Q", "--queues")),
                      ",".join(configured))
        consumed[name] = queues.split(",")
        assert set(consumed[name]) <= set(configured), name
    assert consumed["worker-critical"] == ["notifier.critical", "notifier.deliver.critical"]
    assert consumed["worker"] == [q for q in configured if not q.startswith("notifier.deliver.")]
    deliver = [q for q in configured if q.startswith("notifier.deliver.")]
    assert consumed["worker-deliver"] == deliver
    assert set().union(*consumed.values()) == set(configured)
    for queues in consumed.values():  # most urgent first
        assert queues == sorted(queues, key=configured.index)


def queues_command(kind: str) -> list[str]:
    """What ``notifier queues --<kind>`` prints, run as the installed console script."""
    result = subprocess.run([NOTIFIER, "queues", f"--{kind}"], capture_output=True, text=True,
                            check=True, timeout=60)
    return result.stdout.strip().split(",")


def test_worker_queues_are_the_queues_command(
    app_services: dict[str, dict[str, Any]],
) -> None:
    """Each worker's ``-Q`` is what ``notifier queues`` prints (the Makefile's workers run
    it): a channel added to the registry fails here until compose consumes its queue."""
    expected = {"worker-critical": "critical", "worker": "ingest", "worker-deliver": "deliver"}
    for name, kind in expected.items():
        args = argv(app_services[name])
        queues = args[args.index("-Q") + 1].split(",")
        assert queues == queues_command(kind), f"{name}: -Q is not `notifier queues --{kind}`"


def test_migrate_runs_the_declared_console_script(
    services: dict[str, dict[str, Any]],
) -> None:
    """``notifier db upgrade`` is the pyproject console script and its click command exists."""
    program, *path = argv(services["migrate"])
    assert path == ["db", "upgrade"]
    _resolve_command(program, path)


def test_api_runs_the_declared_console_script(services: dict[str, dict[str, Any]]) -> None:
    """``notifier api`` exists, and the app factory it serves (by import string) makes an
    ASGI app."""
    program, *path = argv(services["api"])
    assert path == ["api"]
    _resolve_command(program, path)
    from notifier.ops.cli.api import APP_FACTORY

    module_name, _, factory = APP_FACTORY.partition(":")
    app = getattr(importlib.import_module(module_name), factory)()
    assert callable(app) and app.openapi()["paths"]


def test_api_listens_on_its_published_port(services: dict[str, dict[str, Any]]) -> None:
    """Inside its container the API listens on every address, on the port that is
    published and health-checked."""
    api = services["api"]
    variables = environment(api)
    assert variables["NOTIFIER_API_ADDRESS"] == "0.0.0.0"
    [(_, _, target)] = [_published(port) for port in api["ports"]]
    assert variables["NOTIFIER_API_PORT"] == target
    assert f"127.0.0.1:{target}/v1/health" in " ".join(api["healthcheck"]["test"])


def _resolve_command(program: str, path: list[str]) -> None:
    """``program path...`` names the pyproject console script and a click command of it."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, attribute = scripts[program].partition(":")
    command = getattr(importlib.import_module(module_name), attribute)
    context = click.Context(command, info_name=program)
    for name in path:
        assert isinstance(command, click.Group), f"{context.command_path} is not a group"
        sub = command.get_command(context, name)
        assert sub is not None, f"{context.command_path} has no command {name!r}"
        context, command = click.Context(sub, info_name=name, parent=context), sub


def test_environment_names_real_settings(app_services: dict[str, dict[str, Any]]) -> None:
    """Every NOTIFIER_* variable set or interpolated is a Settings field (or compose's own)."""
    fields = {f"NOTIFIER_{name.upper()}" for name in Settings.model_fields}
    from notifier.channels import CHANNEL_NAMES

    fields |= {f"NOTIFIER_CHANNELS__{name.upper()}" for name in CHANNEL_NAMES}
    for name, spec in app_services.items():
        variables = set(environment(spec)) - FOREIGN_VARIABLES.get(name, set())
        assert {"NOTIFIER_DATABASE_URL", "NOTIFIER_BROKER_URL"} <= variables, name
        assert variables <= fields, f"{name}: {variables - fields}"
    interpolated = {match[0] for match in _INTERPOLATION.findall(COMPOSE.read_text())}
    notifier_vars = {var for var in interpolated if var.startswith("NOTIFIER_")}
    assert notifier_vars <= fields | COMPOSE_ONLY_VARIABLES


def _interpolated(value: str) -> str:
    """``value`` as compose makes it with no variable set (each ``${VAR:-default}``)."""
    return _INTERPOLATION.sub(lambda m: m[2][2:] if m[2].startswith(":-") else "", value)


def test_urls_are_valid_and_point_at_the_compose_services(
    app_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URLs pass Settings validation and name the compose services: Postgres, RabbitMQ
    as the broker (quorum queues: the production setup), Redis as the state store."""
    from urllib.parse import urlsplit

    from notifier.broker_topology import uses_quorum_queues

    for spec in app_services.values():
        for variable, value in environment(spec).items():
            monkeypatch.setenv(variable, _interpolated(value))
        settings = Settings()
        assert urlsplit(settings.database_url).hostname == "postgres"
        assert urlsplit(settings.broker_url).scheme == "amqp"
        assert urlsplit(settings.broker_url).hostname == "rabbitmq"
        assert uses_quorum_queues(settings)
        assert urlsplit(settings.state_redis_url).hostname == "redis"


def test_the_broker_url_is_the_rabbitmq_service_login(
    services: dict[str, dict[str, Any]], app_services: dict[str, dict[str, Any]],
) -> None:
    """Every app service logs in to the user and virtual host the RabbitMQ service
    creates, with the same password variable (and the same development default)."""
    from urllib.parse import unquote, urlsplit

    rabbit = environment(services["rabbitmq"])
    for name, spec in app_services.items():
        url = urlsplit(environment(spec)["NOTIFIER_BROKER_URL"])
        assert url.username == rabbit["RABBITMQ_DEFAULT_USER"], name
        assert url.password == rabbit["RABBITMQ_DEFAULT_PASS"], name
        assert unquote(url.path.lstrip("/")) == rabbit["RABBITMQ_DEFAULT_VHOST"], name


def test_rabbitmq_keeps_its_queues_across_restarts(compose: dict[str, Any]) -> None:
    """Quorum queues live in the data directory under the node's name: a named volume
    there, and a fixed hostname so a recreated container is the same node and finds them."""
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["hostname"]
    [volume] = [v for v in rabbit["volumes"] if v.split(":")[1] == "/var/lib/rabbitmq"]
    assert volume.split(":")[0] in compose["volumes"]
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]


def test_app_services_wait_for_healthy_dependencies(
    services: dict[str, dict[str, Any]], app_services: dict[str, dict[str, Any]],
) -> None:
    """Postgres, RabbitMQ and Redis have healthchecks; workers and beat start after a
    finished migrate."""
    for name in INFRASTRUCTURE:
        assert services[name].get("healthcheck", {}).get("test"), name
    for name, spec in app_services.items():
        depends = spec["depends_on"]
        if name != "migrate":  # the migration needs Postgres only
            assert depends["redis"]["condition"] == "service_healthy", name
            assert depends["rabbitmq"]["condition"] == "service_healthy", name
        if name in {"migrate", "worker-critical", "worker", "worker-deliver", "beat"}:
            assert depends["postgres"]["condition"] == "service_healthy", name
        if name in {"worker-critical", "worker", "worker-deliver", "beat"}:
            assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_flower_requires_a_login_without_a_default_password(
    services: dict[str, dict[str, Any]],
) -> None:
    """Flower's login comes from a required variable (no default, so never a password in
    the file), in its environment: a --basic-auth flag would show in `ps` on the host."""
    flower = services["flower"]
    assert not any("auth" in arg for arg in argv(flower))
    match = _INTERPOLATION.fullmatch(environment(flower)["FLOWER_BASIC_AUTH"])
    assert match, "FLOWER_BASIC_AUTH must be ${NOTIFIER_FLOWER_BASIC_AUTH:?...}"
    variable, modifier = match.groups()
    assert variable == "NOTIFIER_FLOWER_BASIC_AUTH"
    assert modifier.startswith(":?"), "the variable must be required (${VAR:?message})"
    for found, used in _INTERPOLATION.findall(COMPOSE.read_text()):  # nowhere a default
        if found == "NOTIFIER_FLOWER_BASIC_AUTH":
            assert used.startswith(":?"), used
    for name, spec in services.items():  # only Flower gets a login
        if name != "flower":
            assert not any("FLOWER" in key for key in environment(spec)), name


def _published(port: str | int | dict[str, Any]) -> tuple[str, str, str]:
    """(host address, host port, container port) of a ``ports`` entry."""
    if isinstance(port, dict):  # the long syntax
        return (str(port.get("host_ip", "")), str(port.get("published", "")),
                str(port["target"]))
    parts = str(port).split("/")[0].split(":")  # [[address:]host port:]container port
    host = parts[0] if len(parts) == 3 else ""
    return host, parts[-2] if len(parts) > 1 else "", parts[-1]


def test_ports_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    """No service is reachable from other machines: Postgres trusts every connection, and
    Flower's /metrics and /healthcheck answer without its login."""
    for name, spec in services.items():
        for port in spec.get("ports", []):
            host, published, _ = _published(port)
            assert host == "127.0.0.1" and published, f"{name}: {port!r}"


def test_flower_listens_on_its_published_port(services: dict[str, dict[str, Any]]) -> None:
    """Inside its container Flower must listen on every address (the published port
    arrives there, not on the container's loopback), on the port that is published and
    health-checked."""
    flower = services["flower"]
    _, sub, args = celery_parts(argv(flower))
    options = dict(arg.lstrip("-").split("=", 1) for arg in args if "=" in arg)
    assert sub == "flower"
    assert options["address"] == "0.0.0.0"
    [(_, _, target)] = [_published(port) for port in flower["ports"]]
    assert options["port"] == target
    check = " ".join(flower["healthcheck"]["test"])
    assert f"127.0.0.1:{target}/healthcheck" in check


def test_beat_keeps_its_schedule_on_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]],
) -> None:
    """Beat's schedule file (when each entry last ran) is on a named volume: a beat with
    a new file waits a whole interval before an entry's first run, so a recreated
    container would put retention off again and again. The image makes the directory
    the app user's, so a new volume is writable."""
    args = argv(services["beat"])
    _, _, options = celery_parts(args)
    schedule = options[options.index("--schedule") + 1]
    directory = str(Path(schedule).parent)
    [volume] = [v for v in services["beat"]["volumes"] if v.split(":")[1] == directory]
    assert volume.split(":")[0] in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p {re.escape(directory)} && chown notifier {re.escape(directory)}",
                     dockerfile)
