"""The documentation: the README stays one page, the generated reference pages match the code,
the site builds strictly and fetches nothing from outside itself, and every `curl` example shown
with its output gives that output against a live r3-serve."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest

from conftest import ROOT, ServiceProcess, start_service
from r3_tools import docs

README = ROOT / "README.md"
DOCS = ROOT / "docs"
# A number in a documented output matches the live one to this (outputs are shown rounded).
TOLERANCE = 1e-3
ENV_MARK = re.compile(r"<!--\s*docs-example env:(?P<env>[^>]*)-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


# --------------------------------------------------------------------------- generated pages


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return docs.pages()


def test_generated_reference_pages_match_the_code(generated: dict[str, str]) -> None:
    stale = docs.stale(generated, DOCS / "reference")
    assert not stale, f"stale pages in docs/reference/: {stale}; run `python -m r3_tools.docs`"


def test_check_names_a_stale_or_missing_page(generated: dict[str, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in generated.items():
        (tmp_path / name).write_text(text)
    assert docs.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "presets.md").write_text(generated["presets.md"].replace("| `lppo` |", "| `lpp0` |"))
    (tmp_path / "cli.md").unlink()
    assert docs.main(["--check", "--out", str(tmp_path)]) == 1
    assert sorted(re.findall(r"stale: \S+/(\S+)", capsys.readouterr().err)) == ["cli.md", "presets.md"]
    assert docs.main(["--out", str(tmp_path)]) == 0  # writes them back
    assert docs.stale(generated, tmp_path) == []


def test_configuration_reference_lists_every_setting(generated: dict[str, str]) -> None:
    from r3_service.settings import Settings

    rows = set(re.findall(r"^\| `(R3_[A-Z0-9_]+)` \|", generated["configuration.md"], re.M))
    assert rows == {f"R3_{name.upper()}" for name in Settings.model_fields}


def test_cli_reference_covers_every_console_script(generated: dict[str, str]) -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    headings = re.findall(r"^## (\S+)$", generated["cli.md"], re.M)
    assert headings == list(scripts)
    assert "usage: r3-qtypes load" in generated["cli.md"]  # subcommands too


def test_the_dashboard_queries_only_series_the_service_exports() -> None:
    """A panel querying a renamed or removed series would chart nothing, silently."""
    dashboard = json.loads((ROOT / "deploy/grafana/r3-dashboard.json").read_text())
    queried = {name for row in docs.dashboard_rows(dashboard) for name in re.findall(r"\br3_\w+", row[2])}
    exported = set()
    for series in docs.series():
        exported.add(series.exposed)
        if series.kind == "histogram":
            exported |= {f"{series.name}_{suffix}" for suffix in ("bucket", "count", "sum")}
    assert queried and queried <= exported, f"not exported: {sorted(queried - exported)}"


def test_openapi_page_names_every_path_and_schema(generated: dict[str, str]) -> None:
    schema = json.loads(generated["openapi.json"])
    page = generated["openapi.md"]
    for path, methods in schema["paths"].items():
        for method in methods:
            assert f"### {method.upper()} {path}\n" in page
    for name in schema["components"]["schemas"]:
        assert f"### {name}\n" in page


# --------------------------------------------------------------------------- README and links


def test_readme_is_one_page_linking_into_the_docs() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 200
    linked = {target.split("#")[0] for target in LINK.findall(text)}
    assert {"docs/quickstart.md", "LICENSE", "CHANGELOG.md"} <= linked


def relative_links(path: Path) -> Iterator[tuple[str, Path]]:
    for target in LINK.findall(path.read_text()):
        if not urlsplit(target).scheme and not target.startswith("#"):
            yield target, (path.parent / target.split("#")[0]).resolve()


def test_readme_links_resolve() -> None:
    """The site build checks the docs' links; the README is not part of the site."""
    broken = [target for target, resolved in relative_links(README) if not resolved.exists()]
    assert not broken, f"README.md links to missing files: {broken}"


# --------------------------------------------------------------------------- the site


class AssetUrls(HTMLParser):
    """The URLs a page loads by itself (scripts, styles, images, frames), not the links it shows."""

    LOADS: ClassVar[dict[str, str]] = {
        "script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src", "audio": "src",
        "embed": "src", "link": "href"}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attribute = self.LOADS.get(tag)
        values = dict(attrs)
        if attribute and values.get(attribute):
            self.urls.append(values[attribute] or "")


def external(url: str) -> bool:
    return url.startswith("//") or urlsplit(url).scheme in ("http", "https")


def build_site(source: Path, site: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(source / "mkdocs.yml"),
               "-d", str(site)]
    return subprocess.run(command, cwd=source, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    built = build_site(ROOT, site)
    assert built.returncode == 0, built.stderr[-4000:]
    return site


@pytest.mark.slow
def test_site_builds_strictly_with_every_page(site: Path) -> None:
    import yaml

    def pages(nav: object) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list | dict):
            for value in nav if isinstance(nav, list) else nav.values():
                yield from pages(value)

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = set(pages(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == in_nav, f"not in the nav: {on_disk - in_nav}; missing: {in_nav - on_disk}"
    for page in in_nav:
        assert (site / page).with_suffix(".html").is_file(), page
    assert (site / "reference/openapi.json").is_file()
    plots = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bench/results").glob("*.png")}
    assert plots and all((site / plot).is_file() for plot in plots)


@pytest.mark.slow
def test_site_loads_nothing_from_outside_itself(site: Path) -> None:
    """Offline viewing: no script, style, font or image from a CDN (theme.font: false)."""
    fetched = {}
    for page in site.rglob("*.html"):
        parser = AssetUrls()
        parser.feed(page.read_text())
        fetched.update({url: page.relative_to(site) for url in parser.urls if external(url)})
    for style in site.rglob("*.css"):
        for url in re.findall(r"url\(['\"]?([^'\")]+)", style.read_text()):
            if external(url):
                fetched[url] = style.relative_to(site)
    assert not fetched, f"assets fetched from outside the site: {fetched}"


@pytest.mark.slow
def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for name in ("docs", "tools", "configs", "deploy"):
        shutil.copytree(ROOT / name, copy / name)
    shutil.copytree(ROOT / "bench", copy / "bench", ignore=shutil.ignore_patterns("*.json*", "checkpoint"))
    for name in ("mkdocs.yml", "CHANGELOG.md", "LICENSE"):
        shutil.copy2(ROOT / name, copy / name)
    page = copy / "docs/quickstart.md"
    page.write_text(page.read_text() + "\nSee [the page that is not](no-such-page.md).\n")
    built = build_site(copy, tmp_path / "site")
    assert built.returncode != 0 and "no-such-page.md" in built.stderr


# --------------------------------------------------------------------------- curl examples


@dataclass(frozen=True)
class Example:
    source: str
    command: str
    output: str
    env: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Block:
    start: int  # the opening fence's line (0-based)
    end: int  # the closing fence's line
    lang: str
    body: str
    before: str  # the line above the opening fence


def fenced_blocks(text: str) -> list[Block]:
    lines, blocks, index = text.splitlines(), [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        blocks.append(Block(index, end, opening["lang"], "\n".join(lines[index + 1:end]),
                            lines[index - 1] if index else ""))
        index = end + 1
    return blocks


def examples_in(path: Path) -> list[Example]:
    """`curl` blocks right above a json block: the command and its documented output. A comment
    `<!-- docs-example env: NAME=VALUE ... -->` above the command gives the settings it needs."""
    found, blocks = [], fenced_blocks(path.read_text())
    for block, following in itertools.pairwise(blocks):
        if block.lang == "bash" and block.body.lstrip().startswith("curl ") and following.lang == "json" \
                and following.start == block.end + 1:
            mark = ENV_MARK.match(block.before)
            env = tuple(tuple(item.split("=", 1)) for item in (mark["env"].split() if mark else []))
            found.append(Example(f"{path.relative_to(ROOT)}:{block.start + 1}", block.body, following.body,
                                 env))  # type: ignore[arg-type]
    return found


def all_examples() -> list[Example]:
    return [example for path in doc_files() for example in examples_in(path)]


def mismatches(expected: object, actual: object, where: str = "$") -> list[str]:
    """Where `actual` differs from `expected`: keys and structure exactly, strings and the like
    exactly, numbers to TOLERANCE."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            return [f"{where}: keys {sorted(expected)} != {sorted(actual)}"]
        return [m for key in expected for m in mismatches(expected[key], actual[key], f"{where}.{key}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items != {len(actual)}"]
        return [m for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for m in mismatches(e, a, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) \
            and not isinstance(expected, bool) and not isinstance(actual, bool):
        close = math.isclose(expected, actual, rel_tol=0, abs_tol=TOLERANCE)
        return [] if close else [f"{where}: {expected} != {actual} (tolerance {TOLERANCE})"]
    same = expected == actual and type(expected) is type(actual)
    return [] if same else [f"{where}: {expected!r} != {actual!r}"]


def test_examples_are_found_and_their_outputs_parse() -> None:
    examples = all_examples()
    endpoints = {re.search(r"localhost:8000(/[\w/]+)", e.command)[1] for e in examples}  # type: ignore[index]
    assert {"/reward", "/get_reward", "/slime", "/healthz"} <= endpoints
    assert any(e.source.startswith("README.md") for e in examples)
    assert any(e.env for e in examples)
    for example in examples:
        json.loads(example.output)


def test_the_comparison_catches_a_changed_output() -> None:
    documented = {"rewards": [1.049, 0.0773], "backend": "r3", "components": None}
    assert mismatches(documented, {"rewards": [1.0489, 0.0775], "backend": "r3", "components": None}) == []
    assert mismatches(documented, {"rewards": [1.06, 0.0773], "backend": "r3", "components": None})
    assert mismatches(documented, {"rewards": [1.049], "backend": "r3", "components": None})
    assert mismatches(documented, {"rewards": [1.049, 0.0773], "backend": "r3", "components": None,
                                   "unpaid": None})
    assert mismatches(documented, {"rewards": [1.049, 0.0773], "backend": "li", "components": None})
    assert mismatches({"flag": True}, {"flag": 1})


def run_example(example: Example, service: ServiceProcess) -> object:
    command = re.sub(r"(localhost|127\.0\.0\.1):8000", service.url.removeprefix("http://"), example.command)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{example.source}: curl failed: {done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.slow
def test_curl_examples_print_what_the_docs_show(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each distinct example runs once, on a fresh r3-serve per set of settings (an in-process
    store: the queries classified by other tests' services are not there), at float32."""
    assert shutil.which("curl"), "curl is not installed"
    by_env: dict[tuple[tuple[str, str], ...], list[Example]] = {}
    for example in all_examples():
        by_env.setdefault(example.env, []).append(example)
    failures = []
    for env, examples in by_env.items():
        service = start_service(tmp_path_factory.mktemp("docs-service"), **dict(env))
        try:
            outputs: dict[str, object] = {}
            for example in examples:
                if example.command not in outputs:
                    outputs[example.command] = run_example(example, service)
                found = mismatches(json.loads(example.output), outputs[example.command])
                failures += [f"{example.source}: {m}" for m in found]
        finally:
            service.stop()
    assert not failures, "documented outputs differ from the live service's:\n" + "\n".join(failures)
