"""Console commands check their optional dependencies before doing any work."""

from __future__ import annotations

import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from r3_tools import commands


class Counting(BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[str]:
    Counting.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run_without(module: str, command: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a console command in a Python where `module` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = {[command, *argv]!r}; "
            f"from r3_tools.commands import {command.removeprefix('r3-')} as main; sys.exit(main())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("plot", ["--plot", "--plo"])  # argparse accepts abbreviations
def test_loadtest_plot_without_matplotlib_stops_before_any_load(counting_server: str, tmp_path,
                                                                plot: str) -> None:
    argv = ["--url", counting_server, "--users", "2", "--duration", "2", plot, str(tmp_path / "run.png")]
    ran = run_without("matplotlib", "r3-loadtest", argv)
    assert ran.returncode == 1
    assert "r3-loadtest --plot needs the [bench] extra (missing: matplotlib)" in ran.stderr
    assert "pip install -e '.[bench]'" in ran.stderr and "Traceback" not in ran.stderr
    assert Counting.hits == 0  # no request was sent


def test_loadtest_without_plot_needs_no_matplotlib(counting_server: str) -> None:
    ran = run_without("matplotlib", "r3-loadtest", ["--url", counting_server, "--users", "1",
                                                    "--duration", "0.5", "--mix", "1:1"])
    assert "extra" not in ran.stderr and Counting.hits > 0


def test_bench_without_matplotlib_stops_before_loading_a_model(tmp_path) -> None:
    ran = run_without("matplotlib", "r3-bench", ["--out", str(tmp_path / "b")])
    assert ran.returncode == 1 and "r3-bench needs the [bench] extra (missing: matplotlib)" in ran.stderr
    assert not list(tmp_path.iterdir())


def test_serve_without_the_service_extra_names_it() -> None:
    ran = run_without("fastapi", "r3-serve", ["--port", "1"])
    assert ran.returncode == 1 and "r3-serve needs the [service] extra (missing: fastapi)" in ran.stderr


def test_every_console_script_goes_through_its_check() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, target in project["scripts"].items():
        module, _, function = target.partition(":")
        assert module == "r3_tools.commands" and callable(getattr(commands, function)), name


def test_the_extras_table_names_importable_modules_of_each_extra() -> None:
    """Every module the checks look for is installed with `.[all]` (misspelt names would make a
    complete install look incomplete)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(commands.EXTRAS) <= set(extras)
    assert all(not commands.missing(extra) for extra in commands.EXTRAS)


def run_command(command: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = (f"import sys; sys.argv = {[command, *argv]!r}; "
            f"from r3_tools.commands import {command.removeprefix('r3-')} as main; sys.exit(main())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_r3_qtype_is_a_deprecated_alias_of_r3_qtypes(tmp_path) -> None:
    """One command for the store and the classifier; the old name still works for one release."""
    missing = str(tmp_path / "missing.json")
    new, old = (run_command(name, ["eval", missing]) for name in ("r3-qtypes", "r3-qtype"))
    assert new.returncode == old.returncode == 2
    assert f"no such file: {missing}" in new.stderr and f"no such file: {missing}" in old.stderr
    assert "r3-qtype is deprecated" in old.stderr and "use r3-qtypes" in old.stderr
    assert "is deprecated" not in new.stderr
    subcommands = run_command("r3-qtypes", ["--help"]).stdout
    assert all(name in subcommands for name in ("load", "classify", "train", "eval"))
