"""Start the WebUI: ``python launch.py [--demo] [--api] [--listen --gradio-auth u:p] ...``.

See ``python launch.py --help`` for every flag (A1111-compatible names).
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from webui.settings import SettingsError, apply_offline_env, build_arg_parser, settings_from_args

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_arg_parser().parse_args(argv)
    default_data_dir = HERE
    if args.demo and not args.data_dir:
        default_data_dir = Path(tempfile.mkdtemp(prefix="webui-demo-"))
    try:
        settings = settings_from_args(args, default_data_dir=default_data_dir)
        settings.check_safe()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.demo:
        from webui.demo import write_demo_models

        written = write_demo_models(settings)
        print(f"Demo mode: wrote tiny random-weight models (they produce noise) into {settings.data_dir / 'models'}")
        for path in written:
            print(f"  {path}")
    from webui.app import start

    running = start(settings, open_browser=not args.no_browser and not settings.nowebui)
    print(f"WebUI running on {running.url}")
    if running.share_url:
        print(f"Share link: {running.share_url}")
    if running.share_error:
        print(running.share_error)
    for message in running.ctx.messages:
        print(message)
    empty = running.ctx.empty_models_message()
    if empty:
        print(empty)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Shutting down...")
    finally:
        running.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
