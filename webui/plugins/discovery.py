"""Pure parts of extension discovery: ``extension.toml`` manifests, API version ranges, and importing a
folder extension's entry module under a private name.  Internal (extensions import ``webui.plugins.api``).
"""
from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webui.plugins.api import API_VERSION

MANIFEST = "extension.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class ManifestError(ValueError):
    """An ``extension.toml`` is missing a field or has a bad value; the message names both."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    api: str  # version range, e.g. ">=1.0,<2"
    entry: str  # module (file ``<entry>.py`` or package ``<entry>/``) inside the folder
    description: str = ""


def parse_manifest(text: str, *, where: str = MANIFEST) -> Manifest:
    """Pure: TOML text -> Manifest (``[extension]`` table or top-level keys)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{where}: not valid TOML ({exc})") from None
    data = data.get("extension", data)
    missing = [key for key in ("name", "version", "api") if not isinstance(data.get(key), str) or not data[key]]
    if missing:
        raise ManifestError(f"{where}: missing or empty {', '.join(missing)} (strings; e.g. api = \">=1.0,<2\")")
    name = data["name"]
    if not NAME_RE.match(name):
        raise ManifestError(f"{where}: name {name!r} must be lower-case letters, digits, '-' or '_'")
    entry = data.get("entry", name.replace("-", "_"))
    if not isinstance(entry, str) or not entry.isidentifier():
        raise ManifestError(f"{where}: entry {entry!r} must be a module name")
    parse_range(data["api"], where=where)
    return Manifest(name=name, version=data["version"], api=data["api"], entry=entry,
                    description=str(data.get("description", "")))


def parse_range(text: str, *, where: str = "api") -> Any:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise ManifestError(f"{where}: api range {text!r} is not valid; write e.g. \">=1.0,<2\"") from None


def api_compatible(api_range: str, version: str = API_VERSION) -> bool:
    return parse_range(api_range).contains(version, prereleases=True)


def _import_folder_module(folder: Path, manifest: Manifest) -> Any:
    """Import ``<folder>/<entry>.py`` or ``<folder>/<entry>/__init__.py`` under a private module name."""
    package = folder / manifest.entry / "__init__.py"
    single = folder / f"{manifest.entry}.py"
    path = package if package.is_file() else single
    if not path.is_file():
        raise ModuleNotFoundError(f"{folder}: entry module {manifest.entry!r} not found ({single.name} or "
                                  f"{manifest.entry}/__init__.py)")
    module_name = "webui_ext_" + re.sub(r"\W", "_", manifest.name)
    existing = sys.modules.get(module_name)
    if existing is not None and getattr(existing, "__file__", None) == str(path):
        return existing
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)] if path is package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
