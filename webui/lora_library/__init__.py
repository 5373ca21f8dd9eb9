"""The LoRA library behind the LoRA browser tab: index (header-only, incremental, SQLite-cached), search,
inference of category/base family, bookmarks/usage in ``<data_dir>/webui.db`` and ``name.webui.json`` sidecars."""
from webui.lora_library.index import LoraEntry, ScanReport
from webui.lora_library.library import LoraLibrary
from webui.lora_library.search import Page, Query

__all__ = ["LoraEntry", "LoraLibrary", "Page", "Query", "ScanReport"]
