"""App start time with 0 and with N dummy extensions (goal from issue #9: +<= 1 s for 20).

Each measurement is a fresh process running ``webui.app.start(settings)`` (AppContext + extension
discovery/import/registration + UI build incl. every extension's accordion + Gradio launch), timed from the
call to its return, then ``close()``.  Imports of torch/gradio happen before the timer in both cases.
The shipped examples are disabled in both runs, so "0" means no active extension.  Runs alternate
(0, N, 0, N, ...) and the median is reported.

    python bench/extensions_startup.py [--count 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, socket, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import gradio, torch  # noqa: F401  (import cost is the same with or without extensions)
import webui.context, webui.ui, webui.api  # noqa: F401
from webui.app import start
from webui.settings import Settings
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
settings = Settings.for_data_dir(Path(sys.argv[2]), port=port, extensions_dir=Path(sys.argv[3]))
t0 = time.perf_counter()
app = start(settings)
elapsed = time.perf_counter() - t0
loaded = sum(r.status == "enabled" for r in app.ctx.plugins.records())
app.close()
print(json.dumps({"seconds": elapsed, "enabled": loaded}))
"""

DUMMY = '''
from webui.plugins.api import SettingSpec, UIPart, hookimpl

@hookimpl
def webui_settings():
    return [SettingSpec(key="{name}_level", default=1, label="{name} level", minimum=0, maximum=10)]

@hookimpl
def webui_prompt_syntax(prompt):
    return None

@hookimpl
def webui_on_step(progress):
    pass

def _render(api):
    import gradio as gr
    box = gr.Textbox(label="{name}", elem_id="{name}_box")
    button = gr.Button("{name} go")
    button.click(lambda t: t.upper(), inputs=[box], outputs=[box], api_visibility="private")
    return {{"box": box}}

@hookimpl
def webui_ui():
    return [UIPart(label="{name}", tab="txt2img", render=_render)]
'''


def make_dummies(folder: Path, count: int) -> None:
    for i in range(count):
        name = f"dummy{i:02d}"
        ext = folder / name
        ext.mkdir(parents=True)
        (ext / "extension.toml").write_text(f'name = "{name}"\nversion = "0.1.0"\napi = ">=1.0,<2"\nentry = "main"\n')
        (ext / "main.py").write_text(textwrap.dedent(DUMMY.format(name=name)))


def run_once(data_dir: Path, ext_dir: Path) -> dict:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(data_dir), str(ext_dir)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results: dict[int, list[float]] = {0: [], args.count: []}
        for count in results:
            data = root / f"data{count}"
            data.mkdir()
            (data / "extensions.json").write_text(json.dumps({"disabled": ["wildcards", "contact_sheet"]}))
            make_dummies(root / f"ext{count}", count)
            (root / f"ext{count}").mkdir(exist_ok=True)
        for _ in range(args.repeat):
            for count in results:
                res = run_once(root / f"data{count}", root / f"ext{count}")
                assert res["enabled"] == count, res
                results[count].append(res["seconds"])
        base, many = statistics.median(results[0]), statistics.median(results[args.count])
        print(f"start with 0 extensions:  median {base:.2f} s  runs {[round(x, 2) for x in results[0]]}")
        print(f"start with {args.count} extensions: median {many:.2f} s  runs "
              f"{[round(x, 2) for x in results[args.count]]}")
        print(f"added by {args.count} extensions: {many - base:+.2f} s (goal: <= +1 s)  ratio {many / base:.2f}x")


if __name__ == "__main__":
    main()
