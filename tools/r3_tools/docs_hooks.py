"""MkDocs hooks (mkdocs.yml `hooks:`): the benchmark results under bench/results/ (plots and
Markdown reports) join the site where they lie, so pages show and link them without a copy
in docs/. Only plots and reports: the training runs' checkpoints and logs stay out."""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = "bench/results"
PUBLISHED = ("*.png", "*.md")


def result_files(root: Path) -> list[str]:
    """The published files under bench/results/, as paths relative to the repository root."""
    found = {path for pattern in PUBLISHED for path in (root / RESULTS).rglob(pattern)}
    return sorted(path.relative_to(root).as_posix() for path in found if path.is_file())


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = Path(config.config_file_path).resolve().parent
    for path in result_files(root):
        files.append(File(path, str(root), config.site_dir, config.use_directory_urls,
                          inclusion=InclusionLevel.NOT_IN_NAV))
    return files
