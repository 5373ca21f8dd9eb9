"""Model files: detection (``detect``), the folder catalog (``catalog``), the RAM component cache
(``cache``), loading and LoRA patching.  Import the submodules directly; this package file stays
import-light so that ``webui.models.detect`` never pulls in torch."""
