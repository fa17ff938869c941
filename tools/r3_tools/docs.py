"""The documentation's reference pages, generated from the code so that they cannot drift:
`python -m r3_tools.docs` writes docs/reference/ (the settings, the presets, the Prometheus
series and the Grafana panels, every console script's --help, the OpenAPI schema and a page of
it); `--check` writes nothing and exits 1 naming each page that differs from what it would write.

The --help texts are argparse's, as Python 3.11 formats them at 100 columns (CI's Python)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path("docs/reference")
HELP_COLUMNS = "100"


def banner(source: str) -> str:
    """The first line of every generated page: where it comes from and how to refresh it."""
    return f"<!-- Generated from {source} by `python -m r3_tools.docs`; do not edit by hand. -->\n"


def cell(text: object) -> str:
    """One Markdown table cell: line breaks folded, pipes escaped outside code spans (MkDocs'
    table extension leaves a pipe inside backticks alone, and would keep the backslash)."""
    parts = " ".join(str(text).split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def section(name: str, text: str) -> list[str]:
    """`text` between the snippet markers other pages include it by (`file.md:name`)."""
    return [f"<!-- --8<-- [start:{name}] -->", text, f"<!-- --8<-- [end:{name}] -->\n"]


@contextlib.contextmanager
def without_r3_environment() -> Iterator[None]:
    """The code's own defaults: this shell's R3_* variables (and R3_CONFIG) set aside."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("R3_")}
    try:
        yield
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- settings


def type_text(annotation: Any) -> str:
    """A field's type in words: `int`, `one of a, b`, `[float, float]`, `list of str`..."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in args if arg is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is tuple:
        return "[" + ", ".join(type_text(arg) for arg in args) + "]"
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


CONSTRAINTS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "at least"}


def constraints(field: FieldInfo) -> str:
    found = [f"{CONSTRAINTS[name]} {getattr(rule, name)}" for rule in field.metadata
             for name in CONSTRAINTS if getattr(rule, name, None) is not None]
    return ", ".join(found)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None or value in ({}, []):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def field_rows(model: type[BaseModel], name_of: Callable[[str], str]) -> list[list[str]]:
    rows = []
    for name, field in model.model_fields.items():
        kind = type_text(field.annotation)
        bound = constraints(field)
        rows.append([f"`{name_of(name)}`", kind + (f" ({bound})" if bound else ""), default_text(field),
                     field.description or ""])
    return rows


def code(text: str) -> str:
    """`text` as a code span, special characters written as JSON does (a newline as \\n)."""
    return f"`{json.dumps(text, ensure_ascii=False)[1:-1]}`"


def template_rows() -> list[list[str]]:
    from r3_service.rule.templates import TEMPLATES

    return [[f"`{name}`", code(t.assistant_marker), ", ".join(code(s) for s in t.stop_strings)]
            for name, t in TEMPLATES.items()]


def configuration_page() -> str:
    from r3_service import settings

    header = ["variable", "type", "default", "meaning"]
    parts = [banner("`r3_service.settings.Settings` and the backend specs"), "# Configuration reference\n",
             "Every setting of `r3-serve`, as the settings class declares it. Each is an environment "
             "variable (`R3_` + the name in capitals) or a key of the deployment file named by "
             "`R3_CONFIG` (the name in lower case, without the prefix); environment variables override "
             "the file. The [configuration guide](../configuration.md) explains them.\n",
             "## Settings\n", table(header, field_rows(settings.Settings, lambda n: f"R3_{n.upper()}"))]
    parts += ["## Chat templates\n",
              "The names `R3_CHAT_TEMPLATE` and a reward model's `input_format` accept. The service "
              "removes a detected template from a query, and a response is cut at its role prefixes "
              "(stop strings).\n",
              table(["name", "response starts after", "stop strings"], template_rows())]
    parts.append("## Backend kinds\n\nThe entries of `backends:` in the deployment file, by `kind`.\n")
    for spec in (settings.R3BackendSpec, settings.RewardModelSpec, settings.EnsembleSpec,
                 settings.EnsembleMember):
        doc = (spec.__doc__ or "").strip()
        parts += [f"### {spec.__name__}\n", f"{doc}\n" if doc else "",
                  table(["key", "type", "default", "meaning"], field_rows(spec, str))]
    return "\n".join(part for part in parts if part)


# --------------------------------------------------------------------------- presets


def presets_page() -> str:
    from r3_service.rule.reward import PRESETS
    from r3_service.settings import Settings

    default = Settings.model_fields["default_backend"].default
    rows = [[f"`{name}`" + (" (default)" if name == default else ""), preset.description,
             "yes" if preset.uses_relevance else "no", "yes" if preset.uses_query_type else "no",
             "yes" if preset.guarded else "no"] for name, preset in PRESETS.items()]
    return "\n".join([
        banner("`r3_service.rule.reward.PRESETS`"), "# Presets\n",
        "The reward rules a backend of kind `r3` can run (`preset:`). Without `backends:` in the "
        "deployment file, the service serves one backend per preset, named after it. Which one to "
        "train with: [Reward presets and the audit](../presets.md).\n",
        *section("table", table(["preset", "reward", "relevance S", "query type matters",
                                 "pays content only"], rows))])


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Series:
    name: str
    kind: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    help: str

    @property
    def exposed(self) -> str:
        """The name a query uses: counters gain `_total`."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


class _Zero:
    """Stand-in counts for the store's and the llm classifier's scrape-time collectors."""

    hits = misses = errors = fallbacks = requests = retries = answered = 0


def series() -> list[Series]:
    """Every series of the service's registry (the store and llm collectors included)."""
    from prometheus_client.metrics import MetricWrapperBase

    from r3_service.metrics import Metrics

    metrics = Metrics()
    metrics.watch_store(_Zero())
    metrics.watch_llm(_Zero())
    wrappers = {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    found = []
    for family in metrics.registry.collect():
        wrapper = wrappers.get(family.name)
        if wrapper is not None:
            labels = tuple(wrapper._labelnames)
            buckets = tuple(b for b in getattr(wrapper, "_upper_bounds", ()) if b != float("inf"))
        else:
            labels = tuple(dict.fromkeys(k for s in family.samples for k in s.labels))
            buckets = ()
        found.append(Series(family.name, family.type, labels, buckets, family.documentation))
    return sorted(found, key=lambda s: s.name)


def dashboard_rows(dashboard: dict[str, Any]) -> list[list[str]]:
    """(row, panel, its queries) per panel, in the dashboard's order."""
    rows, row_title = [], ""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            row_title = panel.get("title", "")
            continue
        queries = "<br>".join(f"`{t['expr']}`" for t in panel.get("targets", []) if t.get("expr"))
        rows.append([row_title, panel.get("title", ""), queries])
    return rows


def scored(s: Series) -> bool:
    """A series of what was scored (per backend), as opposed to the service's own health."""
    return "backend" in s.labels and "endpoint" not in s.labels


def series_table(found: list[Series]) -> str:
    return table(["series", "type", "labels", "buckets", "what"], [
        [f"`{s.exposed}`", s.kind, ", ".join(f"`{label}`" for label in s.labels),
         ", ".join(f"{b:g}" for b in s.buckets), s.help] for s in found])


def metrics_page(root: Path) -> str:
    found = series()
    dashboard = json.loads((root / "deploy/grafana/r3-dashboard.json").read_text())
    return "\n".join([
        banner("`r3_service.metrics.Metrics` and `deploy/grafana/r3-dashboard.json`"),
        "# Metrics reference\n",
        "Every series `GET /metrics` exports (Prometheus text format). A histogram `NAME` also "
        "exports `NAME_bucket`, `NAME_count` and, unless it has negative buckets, `NAME_sum`. Under "
        "Ray Serve each series also carries `replica`. What to watch: [Metrics and the "
        "dashboard](../operations/metrics.md).\n",
        "## The service\n", series_table([s for s in found if not scored(s)]),
        "## What was scored\n", "Per backend: what to watch for reward hacking.\n",
        *section("scored", series_table([s for s in found if scored(s)])),
        "## Grafana dashboard panels\n",
        f"`deploy/grafana/r3-dashboard.json` ({cell(dashboard.get('title', ''))}): each panel and "
        "its PromQL.\n",
        *section("panels", table(["row", "panel", "queries"], dashboard_rows(dashboard)))])


# --------------------------------------------------------------------------- command line


class _Parsed(BaseException):  # not an Exception: no `except Exception` in an entry point stops it
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


@contextlib.contextmanager
def capturing_parsers() -> Iterator[None]:
    """While active, a parser that is asked to parse raises `_Parsed` instead: an entry point
    hands over its parser before doing any work."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self)

    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]


def entry_parser(target: str, name: str) -> argparse.ArgumentParser:
    """The parser a console script's entry point (`module:function`) builds."""
    module, function = target.split(":")
    entry = getattr(import_module(module), function)
    argv = sys.argv
    try:
        with capturing_parsers(), contextlib.redirect_stderr(io.StringIO()):
            sys.argv = [name]
            entry()
    except _Parsed as parsed:
        return parsed.parser
    finally:
        sys.argv = argv
    raise RuntimeError(f"{name} ({target}) returned without parsing its arguments")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_block(parser: argparse.ArgumentParser) -> str:
    return "```text\n" + parser.format_help().rstrip() + "\n```\n"


def cli_page(root: Path) -> str:
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    parts = [banner("the argparse parsers of `[project.scripts]` in pyproject.toml"),
             "# Command-line reference\n",
             "Every console script the package installs, with its `--help`. Each checks first that "
             "the extras it needs are installed and names the one to install when not.\n"]
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        for name, target in scripts.items():
            parser = entry_parser(target, name)
            if parser.prog != name and parser.prog in scripts:  # an alias: the other's parser
                parts += [f"## {name}\n", f"Entry point: `{target}`. An alias of "
                          f"[{parser.prog}](#{parser.prog}): the same arguments.\n"]
                continue
            parts += [f"## {name}\n", f"Entry point: `{target}`.\n", help_block(parser)]
            for sub, subparser in subcommands(parser).items():
                parts += [f"### {name} {sub}\n", help_block(subparser)]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


# --------------------------------------------------------------------------- OpenAPI


def openapi_schema() -> dict[str, Any]:
    from r3_service.api.app import create_app
    from r3_service.settings import Settings

    return create_app(Settings()).openapi()


def schema_type(schema: dict[str, Any]) -> str:
    """A JSON schema in words, with `$ref`s as links to their section."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(schema_type(option) for option in schema[key])
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        items = schema_type(schema["items"]) if schema.get("items") else ""
        return f"array of ({items})" if " or " in items else f"array of {items}" if items else "array"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {schema_type(schema['additionalProperties'])}"
    return str(kind)


def operation_section(path: str, method: str, operation: dict[str, Any]) -> str:
    parts = [f"### {method.upper()} {path}\n"]
    if operation.get("summary"):
        parts.append(f"**{operation['summary']}**\n")
    if operation.get("description"):
        parts.append(operation["description"].strip() + "\n")
    parameters = operation.get("parameters", [])
    if parameters:
        parts.append(table(["parameter", "in", "type", "required", "meaning"], [
            [f"`{p['name']}`", p["in"], schema_type(p.get("schema", {})),
             "yes" if p.get("required") else "no", p.get("description", "")] for p in parameters]))
    body = operation.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        parts.append(f"Request body (`{media}`): {schema_type(content.get('schema', {}))}\n")
    rows = []
    for status, response in operation.get("responses", {}).items():
        content = response.get("content", {})
        schemas = ", ".join(f"{schema_type(c.get('schema', {}))} (`{m}`)" for m, c in content.items())
        rows.append([f"`{status}`", response.get("description", ""), schemas])
    parts.append(table(["status", "meaning", "body"], rows))
    return "\n".join(parts)


def schema_section(name: str, schema: dict[str, Any]) -> str:
    parts = [f"### {name}\n"]
    if schema.get("description"):
        parts.append(schema["description"].strip() + "\n")
    required = set(schema.get("required", []))
    properties = schema.get("properties", {})
    if properties:
        parts.append(table(["field", "type", "required", "default", "meaning"], [
            [f"`{field}`", schema_type(spec), "yes" if field in required else "no",
             f"`{json.dumps(spec['default'])}`" if "default" in spec else "",
             spec.get("description", "")] for field, spec in properties.items()]))
    else:
        parts.append(f"Type: {schema_type(schema)}.\n")
    extra = schema.get("additionalProperties")
    if extra is True:
        parts.append("Keys not listed here are accepted and ignored.\n")
    elif extra is False:
        parts.append("Any other key is a 422.\n")
    return "\n".join(parts)


def openapi_page(schema: dict[str, Any]) -> str:
    info = schema["info"]
    parts = [banner("`create_app(Settings()).openapi()`"), "# OpenAPI reference\n",
             f"{info['title']} {info['version']}, OpenAPI {schema['openapi']}. {info.get('description', '')} "
             "The schema itself: [openapi.json](openapi.json) (the service serves it at "
             "`/openapi.json`, with Swagger UI at `/docs` and ReDoc at `/redoc`). Examples: "
             "[the API](../api.md).\n", "## Endpoints\n"]
    for path, methods in schema["paths"].items():
        parts += [operation_section(path, method, op) for method, op in methods.items()]
    parts.append("## Schemas\n")
    parts += [schema_section(name, s) for name, s in schema.get("components", {}).get("schemas", {}).items()]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the pages


def pages(root: Path = ROOT) -> dict[str, str]:
    """Every generated page: its path under docs/reference/ and its text."""
    with without_r3_environment():
        schema = openapi_schema()
        return {
            "configuration.md": configuration_page(),
            "presets.md": presets_page(),
            "metrics.md": metrics_page(root),
            "cli.md": cli_page(root),
            "openapi.json": json.dumps(schema, indent=2, ensure_ascii=False) + "\n",
            "openapi.md": openapi_page(schema),
        }


def stale(generated: dict[str, str], directory: Path) -> list[str]:
    """The pages whose file under `directory` is missing or differs."""
    return [name for name, text in generated.items()
            if not (directory / name).is_file() or (directory / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_tools.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    parser.add_argument("--out", type=Path, default=ROOT / REFERENCE, help="default: docs/reference")
    args = parser.parse_args(argv)
    generated = pages()
    outdated = stale(generated, args.out)
    if args.check:
        for name in outdated:
            print(f"stale: {args.out / name} (run python -m r3_tools.docs)", file=sys.stderr)
        return 1 if outdated else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in outdated:
        (args.out / name).write_text(generated[name])
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
