"""The README's picture of the Artifacts dashboard, taken from a monitored run in headless
Chromium through a real TensorBoard:

    python tests/browser/dashboard_screenshot.py runs demo_supervised/version_0 \\
        docs/artifacts_dashboard.png

(``make demo`` writes ``runs/demo_supervised/version_N``). The PNG is reduced to a palette of
at most 64 colours to stay small."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the helpers beside this file and in tests/

from chromium import Chromium, chromium_executable  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard_server import tensorboard  # noqa: E402

READY = "artifacts/backbone/high_norm_share_relative/output"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="the folder TensorBoard reads")
    parser.add_argument("run", help="the run in it, e.g. demo_supervised/version_0")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=760)
    opts = parser.parse_args()
    with (
        tensorboard(opts.logdir, READY, opts.run) as server,
        Chromium(chromium_executable(), opts.width, opts.height) as browser,
    ):
        browser.open(f"{server.url}/#custom_scalars")
        browser.wait_for(["Artifacts", "Matches ("])
        time.sleep(3)  # the charts draw after their data arrives
        shot = browser.screenshot(opts.out.with_suffix(".tmp.png"))
    Image.open(shot).convert("RGB").quantize(colors=64).save(shot, optimize=True)
    os.replace(shot, opts.out)
    print(f"wrote {opts.out} ({opts.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
