"""``refsyncbn.__version__``: the installed distribution's version (package metadata)."""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path


def _version() -> str:
    """Installed version; a source checkout used without installing reads its setup.cfg."""
    try:
        return metadata.version("refsyncbn")
    except metadata.PackageNotFoundError:
        parser = configparser.ConfigParser()
        parser.read(Path(__file__).resolve().parents[1] / "setup.cfg", encoding="utf-8")
        return parser.get("metadata", "version", fallback="0+unknown")


__version__ = _version()
