"""Discover, check, load and isolate extensions (internal: extensions import ``webui.plugins.api`` only).

Sources, in order (the first of two extensions with the same name wins, the other is reported):
1. folders ``<dir>/<name>/extension.toml`` in each configured extensions directory;
2. installed distributions with an entry point in the group ``webui.extensions`` (the object it names is
   the plugin; its module declares ``WEBUI_API = ">=1.0,<2"``).

pluggy holds the hook specs and implementations, but it does not isolate failures (the first raising
implementation aborts the whole call), so every call goes through ``_call``: it iterates
``hook.get_hookimpls()`` in pluggy's order and calls each implementation itself with only the arguments it
declares (pluggy's opt-in arguments), inside ``try/except``.  An exception disables that extension until
restart, logs the traceback and keeps it in ``record.error`` for the Extensions tab.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pluggy

from webui.plugins import spec as hookspecs
from webui.plugins.discovery import (  # noqa: F401  (re-exported for tests and the installer)
    MANIFEST, NAME_RE, Manifest, ManifestError, _import_folder_module, api_compatible, parse_manifest, parse_range)
from webui.plugins.api import API_VERSION, PROJECT, ExtensionAPI, SettingSpec, UIPart
from webui.types import GenerationRequest, Progress, RequestError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "webui.extensions"
REPO_EXTENSIONS_DIR = Path(__file__).resolve().parents[2] / "extensions"  # next to launch.py

# record.status values
ENABLED, DISABLED, ERROR, INCOMPATIBLE, INVALID, DUPLICATE = (
    "enabled", "disabled", "error", "incompatible", "invalid", "duplicate")


@dataclass
class ExtensionRecord:
    """What the Extensions tab shows about one extension (mutable: status changes at run time)."""

    name: str
    version: str = "?"
    source: str = ""  # "folder <path>" or "entry point <dist>"
    api: str = ""
    description: str = ""
    status: str = DISABLED
    error: str | None = None
    path: Path | None = None
    plugin: Any = field(default=None, repr=False)
    facade: ExtensionAPI | None = field(default=None, repr=False)
    loader: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.status == ENABLED


class PluginManager:
    def __init__(self, *, folders: Sequence[Path], state_file: Path, data_root: Path,
                 option_getter: Callable[[str], Any] = lambda key: (_ for _ in ()).throw(KeyError(key)),
                 listens_publicly: bool = False, entry_point_group: str | None = ENTRY_POINT_GROUP,
                 api_version: str = API_VERSION):
        self.folders = [Path(f) for f in folders]
        self.state_file = Path(state_file)
        self.data_root = Path(data_root)
        self.api_version = api_version
        self._option = option_getter
        self._public = listens_publicly
        self._group = entry_point_group
        self._lock = threading.RLock()
        self._records: dict[str, ExtensionRecord] = {}
        self._disabled: set[str] = set()
        self._setting_specs: list[tuple[str, SettingSpec]] | None = None
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # ---- discovery and loading ------------------------------------------------------------
    def load(self) -> "PluginManager":
        self._disabled = set(self._read_state().get("disabled", []))
        for folder in self.folders:
            for manifest_path in sorted(folder.glob(f"*/{MANIFEST}")) if folder.is_dir() else ():
                self._add(self._folder_record(manifest_path.parent))
        if self._group:
            for ep in importlib.metadata.entry_points(group=self._group):
                self._add(self._entry_point_record(ep))
        for record in list(self._records.values()):
            self._activate(record)
        return self

    def add_folder(self, folder: Path) -> ExtensionRecord:
        """Load one more extension folder now (after an install)."""
        record = self._folder_record(Path(folder))
        self._add(record)
        self._activate(record)
        return record

    def _add(self, record: ExtensionRecord) -> None:
        with self._lock:
            if record.name in self._records:
                first = self._records[record.name]
                dup = f"{record.name}@{record.source}"
                self._records[dup] = ExtensionRecord(
                    name=dup, version=record.version, source=record.source, status=DUPLICATE,
                    error=f"another extension named {record.name!r} is already loaded from {first.source}")
                return
            self._records[record.name] = record

    def _folder_record(self, folder: Path) -> ExtensionRecord:
        manifest_path = folder / MANIFEST
        try:
            manifest = parse_manifest(manifest_path.read_text(encoding="utf-8"), where=str(manifest_path))
        except (OSError, ManifestError, UnicodeDecodeError) as exc:
            return ExtensionRecord(name=folder.name, source=f"folder {folder}", path=folder, status=INVALID,
                                   error=str(exc))
        record = ExtensionRecord(name=manifest.name, version=manifest.version, source=f"folder {folder}",
                                 api=manifest.api, description=manifest.description, path=folder)
        record.loader = lambda: _import_folder_module(folder, manifest)
        return record

    def _entry_point_record(self, ep: Any) -> ExtensionRecord:
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) or "?"
        record = ExtensionRecord(name=ep.name, version=getattr(dist, "version", "?") or "?",
                                 source=f"entry point {dist_name} ({ep.value})")
        if not NAME_RE.match(ep.name):
            record.status, record.error = INVALID, f"entry point name {ep.name!r} must be lower-case letters/digits"
        record.loader = ep.load
        return record

    def _activate(self, record: ExtensionRecord) -> None:
        if record.status in (INVALID, DUPLICATE) or record.loader is None:
            return
        if record.api:
            if not api_compatible(record.api, self.api_version):
                self._refuse(record)
                return
        if record.name in self._disabled:
            record.status = DISABLED
            return
        try:
            plugin = record.loader()
        except Exception:
            self._mark(record, ERROR, f"import failed:\n{traceback.format_exc()}")
            return
        if not record.api:  # entry points declare their range in the module
            module = sys.modules.get(getattr(plugin, "__module__", "") or "", plugin)
            record.api = str(getattr(plugin, "WEBUI_API", "") or getattr(module, "WEBUI_API", ""))
            if not record.api:
                self._mark(record, INCOMPATIBLE, f"declares no API range: set WEBUI_API = \">=1.0,<2\" in its "
                                                 f"module (this app provides API {self.api_version})")
                return
            try:
                compatible = api_compatible(record.api, self.api_version)
            except ManifestError as exc:
                self._mark(record, INVALID, str(exc))
                return
            if not compatible:
                self._refuse(record)
                return
        record.facade = ExtensionAPI(name=record.name, folder=record.path, data_dir=self.data_root / record.name,
                                     logger=logging.getLogger(f"webui.ext.{record.name}"), _option=self._option,
                                     _listens_publicly=self._public)
        try:
            self.pm.register(plugin, name=record.name)
            unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or () if not hc.has_spec()]
            if unknown:
                self.pm.unregister(plugin)
                raise pluggy.PluginValidationError(
                    plugin, f"implements unknown hook(s) {', '.join(unknown)} (not in API {self.api_version})")
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._mark(record, INVALID, f"refused by the hook checker: {exc}")
            return
        record.plugin = plugin
        record.status = ENABLED

    def _refuse(self, record: ExtensionRecord) -> None:
        self._mark(record, INCOMPATIBLE, f"needs API {record.api}, this app provides {self.api_version}; "
                                         "update the extension (or the app)")

    def _mark(self, record: ExtensionRecord, status: str, error: str) -> None:
        record.status, record.error = status, error
        log.warning("extension %s not loaded: %s", record.name, error.splitlines()[0] if error else status)

    # ---- state ----------------------------------------------------------------------------
    def records(self) -> list[ExtensionRecord]:
        with self._lock:
            return list(self._records.values())

    def get(self, name: str) -> ExtensionRecord:
        return self._records[name]

    def is_enabled(self, name: str) -> bool:
        return name not in self._disabled

    def set_enabled(self, name: str, enabled: bool) -> ExtensionRecord:
        """Persist the choice; disabling stops its hooks now, enabling loads it now (UI/routes: restart)."""
        with self._lock:
            record = self._records[name]
            if enabled:
                self._disabled.discard(name)
            else:
                self._disabled.add(name)
            self._write_state()
            if not enabled and record.status == ENABLED:
                record.status = DISABLED
            elif enabled and record.status == DISABLED:
                if record.plugin is not None:
                    record.status = ENABLED
                else:
                    self._activate(record)
            return record

    def _read_state(self) -> dict:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        from webui.options import atomic_write_text

        data = self._read_state()
        data["disabled"] = sorted(self._disabled)
        atomic_write_text(self.state_file, json.dumps(data, indent=2, sort_keys=True))

    # ---- isolated calls -------------------------------------------------------------------
    def _fail(self, record: ExtensionRecord, where: str) -> None:
        text = f"{where} raised:\n{traceback.format_exc()}"
        with self._lock:
            record.status, record.error = ERROR, text
        log.error("extension %s disabled until restart: %s", record.name, text)

    def guard(self, name: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` (extension code outside a hook, e.g. a UI render function) with isolation."""
        record = self._records[name]
        if not record.active:
            return None
        try:
            return fn(*args, **kwargs)
        except RequestError:
            raise
        except Exception:
            self._fail(record, where)
            return None

    def _call(self, hook_name: str, **kwargs: Any) -> Iterable[tuple[ExtensionRecord, Any]]:
        """Yield ``(record, result)`` per active implementation, in pluggy's call order."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            record = self._records.get(impl.plugin_name)
            if record is None or not record.active:
                continue
            available = {**kwargs, "api": record.facade}
            args = {k: available[k] for k in (*impl.argnames, *impl.kwargnames) if k in available}
            try:
                result = impl.function(**args)
            except RequestError:  # an intentional, user-facing refusal: report it, keep the extension
                raise
            except Exception:
                self._fail(record, f"{hook_name}")
                continue
            yield record, result

    def _chain(self, hook_name: str, key: str, value: Any, check: Callable[[Any], bool], **kwargs: Any) -> Any:
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            record = self._records.get(impl.plugin_name)
            if record is None or not record.active:
                continue
            available = {**kwargs, key: value, "api": record.facade}
            args = {k: available[k] for k in (*impl.argnames, *impl.kwargnames) if k in available}
            try:
                result = impl.function(**args)
                if result is not None and not check(result):
                    raise TypeError(f"{hook_name} returned {type(result).__name__}, not the expected type")
            except RequestError:
                raise
            except Exception:
                self._fail(record, hook_name)
                continue
            if result is not None:
                value = result
        return value

    # ---- hooks, as the app calls them -----------------------------------------------------
    def modify_request(self, request: GenerationRequest) -> GenerationRequest:
        request = self._chain("webui_modify_request", "request", request,
                              lambda r: isinstance(r, GenerationRequest))
        prompt = self._chain("webui_prompt_syntax", "prompt", request.prompt, lambda r: isinstance(r, str),
                             seed=request.seed, negative=False)
        negative = self._chain("webui_prompt_syntax", "prompt", request.negative_prompt,
                               lambda r: isinstance(r, str), seed=request.seed, negative=True)
        if prompt != request.prompt or negative != request.negative_prompt:
            request = request.with_changes(prompt=prompt, negative_prompt=negative)
        return request

    def on_step(self, progress: Progress, request: GenerationRequest) -> None:
        for _ in self._call("webui_on_step", progress=progress, request=request):
            pass

    def postprocess_image(self, image: Any, *, seed: int, index: int, request: GenerationRequest) -> Any:
        return self._chain("webui_postprocess_image", "image", image, lambda r: hasattr(r, "size") and hasattr(r, "mode"),
                           seed=seed, index=index, request=request)

    def setting_specs(self) -> list[tuple[str, SettingSpec]]:
        """``(extension, spec)`` pairs, collected once (the options store and the UI share them)."""
        if self._setting_specs is None:
            specs = []
            for record, result in self._call("webui_settings"):
                for item in result or ():
                    if isinstance(item, SettingSpec):
                        specs.append((record.name, item))
            self._setting_specs = specs
        return self._setting_specs

    def option_specs(self) -> list[Any]:
        """The extensions' settings as ``webui.options.OptionSpec`` (section ``Extension: <name>``)."""
        from webui.options import OptionSpec

        out = []
        for name, item in self.setting_specs():
            choices = tuple(item.choices) if item.choices else None
            out.append(OptionSpec(item.key, item.default, item.kind or type(item.default), item.label,
                                  f"Extension: {name}", item.minimum, item.maximum,
                                  (lambda c=choices: list(c)) if choices else None))
        return out

    def ui_parts(self) -> list[tuple[str, UIPart]]:
        parts = []
        for record, result in self._call("webui_ui"):
            parts.extend((record.name, p) for p in (result or ()) if isinstance(p, UIPart))
        return parts

    def registry_entries(self, hook_name: str) -> list[tuple[str, Any]]:
        """Entries of a registry hook (``webui_samplers``, ``webui_upscalers``...): ``(extension, NamedEntry)``."""
        return [(record.name, entry) for record, result in self._call(hook_name) for entry in (result or ())]

    # ---- registry entries (samplers, schedule types): webui.generation.samplers.ExtensionCalls ----------
    def extension_active(self, name: str) -> bool:
        return name in self._records and self._records[name].active

    def call_entry(self, name: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an entry's factory (wrapped in ``fn``): ``RequestError`` if the extension is not active, or if
        ``fn`` raises, which also disables the extension until restart, as with a failing hook."""
        record = self._records.get(name)
        if record is None or not record.active:
            raise RequestError(f"{where} is not available: its extension {name!r} is "
                               f"{record.status if record else 'not loaded'} (see the Extensions tab)")
        try:
            return fn(*args, **kwargs)
        except RequestError:
            raise
        except Exception as exc:
            self._fail(record, where)
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise RequestError(f"{where} from extension {name!r} failed ({type(exc).__name__}: {first}); the "
                               "extension is disabled until restart, its traceback is in the Extensions tab") from None

    def report_problem(self, name: str, message: str) -> None:
        """Note a refused entry (bad or clashing name) on an extension that stays enabled."""
        with self._lock:
            record = self._records.get(name)
            if record is not None:
                record.error = f"{record.error}\n{message}" if record.error else message

    def install_routes(self, app: Any, route_cls: Any) -> list[str]:
        """Mount ``/ext/<name>`` routers (with the app's auth route class) for every active extension."""
        from fastapi import APIRouter, Depends, HTTPException

        mounted = []
        hook = self.pm.hook.webui_api_routes
        names = {impl.plugin_name for impl in hook.get_hookimpls()}
        for record in self.records():
            if record.name not in names or not record.active:
                continue
            router = APIRouter(prefix=f"/ext/{record.name}", route_class=route_cls, tags=[f"ext:{record.name}"],
                               dependencies=[Depends(_enabled_check(record, HTTPException))])
            impl = next(i for i in hook.get_hookimpls() if i.plugin_name == record.name)
            available = {"router": router, "api": record.facade}
            args = {k: available[k] for k in (*impl.argnames, *impl.kwargnames) if k in available}
            try:
                impl.function(**args)
            except Exception:
                self._fail(record, "webui_api_routes")
                continue
            app.include_router(router)
            mounted.append(record.name)
        return mounted


def _enabled_check(record: ExtensionRecord, http_exception: type) -> Callable[[], None]:
    def check() -> None:  # no parameters: FastAPI would read them from the query string
        if not record.active:
            raise http_exception(404, f"extension {record.name!r} is {record.status}")

    return check


def default_folders(settings: Any) -> list[Path]:
    """The user's extensions dir (``--extensions-dir``) and the repo's shipped ``extensions/``."""
    user = getattr(settings, "extensions_dir", None) or settings.data_dir / "extensions"
    folders = [Path(user)]
    if REPO_EXTENSIONS_DIR.resolve() != Path(user).resolve():
        folders.append(REPO_EXTENSIONS_DIR)
    return folders


def from_settings(settings: Any, option_getter: Callable[[str], Any]) -> PluginManager:
    return PluginManager(folders=default_folders(settings), state_file=settings.data_dir / "extensions.json",
                         data_root=settings.data_dir / "extensions-data", option_getter=option_getter,
                         listens_publicly=settings.listens_publicly)
