"""What a newcomer and a packager rely on: version, license, typing marker, docs, layout."""

from __future__ import annotations

import ast
import configparser
import re
from importlib import metadata
from pathlib import Path

import pytest

import refsyncbn
from refsyncbn import _version

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


class TestVersion:
    def test_version_is_the_setup_cfg_version(self):
        assert refsyncbn.__version__ == _setup_cfg()["metadata"]["version"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", refsyncbn.__version__)

    def test_uninstalled_checkout_reads_setup_cfg(self, monkeypatch):
        def not_installed(name):
            raise metadata.PackageNotFoundError(name)

        monkeypatch.setattr(metadata, "version", not_installed)
        assert _version._version() == _setup_cfg()["metadata"]["version"]

    def test_installed_distribution_wins(self, monkeypatch):
        monkeypatch.setattr(metadata, "version", lambda name: "9.8.7")
        assert _version._version() == "9.8.7"

    def test_unknown_attributes_still_raise(self):
        with pytest.raises(AttributeError, match="no attribute 'versio'"):
            refsyncbn.versio  # noqa: B018


class TestDistributionFiles:
    def test_license_is_the_declared_bsd_3_clause(self):
        assert _setup_cfg()["metadata"]["license"] == "BSD-3-Clause"
        text = (ROOT / "LICENSE").read_text()
        assert text.startswith("BSD 3-Clause License") and "Neither the name" in text

    def test_py_typed_ships_with_the_package(self):
        assert (ROOT / "refsyncbn" / "py.typed").is_file()
        assert "py.typed" in _setup_cfg()["options.package_data"]["refsyncbn"]

    def test_changelog_has_an_unreleased_and_the_current_version_section(self):
        text = (ROOT / "CHANGELOG.md").read_text()
        assert "## Unreleased" in text
        assert f"## {refsyncbn.__version__}" in text


class TestDocs:
    def test_readme_links_the_design_document_in_the_repository(self):
        readme = (ROOT / "README.md").read_text()
        assert "docs/design.md" in readme and (ROOT / "docs" / "design.md").is_file()

    @pytest.mark.parametrize("path", ["README.md", "CHANGELOG.md", "docs"])
    def test_nothing_links_outside_the_repository(self, path):
        files = sorted((ROOT / path).glob("*.md")) if (ROOT / path).is_dir() else [ROOT / path]
        for f in files:
            assert "../shared" not in f.read_text(), f"{f.name} links into ../shared"

    def test_readme_starts_from_a_clone_and_a_venv(self):
        readme = (ROOT / "README.md").read_text()
        setup = readme[readme.index("## Set up") :]
        assert (
            setup.index("git clone") < setup.index("python3 -m venv") < setup.index("pip install")
        )
        low = _setup_cfg()["options"]["python_requires"].strip().removeprefix(">=")
        assert f"Python {low}" in setup


class TestLayout:
    def test_dense_paddle_layers_never_import_the_sparse_ones(self):
        tree = ast.parse((ROOT / "refsyncbn/compat/paddle/__init__.py").read_text())
        siblings = [
            (node.module, [a.name for a in node.names])
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
        ]
        assert not any(
            module == "sparse" or (module is None and "sparse" in names)
            for module, names in siblings
        ), siblings

    def test_paddle_sparse_is_reachable_as_an_attribute(self):
        from refsyncbn.compat import paddle

        assert paddle.sparse.SyncBatchNorm.__module__ == "refsyncbn.compat.paddle.sparse"
