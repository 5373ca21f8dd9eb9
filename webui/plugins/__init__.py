"""Extensions: a small, versioned plugin API (see ``docs/extensions.md``).

Plugins import only :mod:`webui.plugins.api`.  ``spec`` holds the hook specifications and ``manager``
discovers, checks, loads and isolates plugins; both are internal to the app.
"""
