"""Headless Chromium driven through the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ended by a NUL byte on file descriptors 3 and 4), so that a test reads the text a
page shows, inside shadow DOMs too (TensorBoard's dashboards are web components), and takes
screenshots; only the standard library is needed."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL = Path(__file__).with_name("install_chromium.sh")

# The visible text of the page: text nodes under the document and every open shadow root,
# those whose element is rendered (not display:none); scripts and styles left out.
VISIBLE_TEXT = """(() => {
  const out = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) {
        const parent = child.parentElement;
        if (!parent || parent.checkVisibility()) out.push(child.textContent);
      } else if (!["SCRIPT", "STYLE", "TEMPLATE"].includes(child.nodeName)) {
        walk(child);
      }
    }
  };
  walk(document.documentElement);
  return out.join(" ").replace(/\\s+/g, " ");
})()"""


def chromium_executable() -> str:
    """The ``chromium`` on PATH, installed first by ``install_chromium.sh`` (Debian's
    package, as root) when there is none."""
    found = shutil.which("chromium")
    if found is None:
        result = subprocess.run([str(INSTALL)], capture_output=True, text=True)
        found = shutil.which("chromium")
        if found is None:
            raise RuntimeError(
                f"no chromium on PATH and {INSTALL} could not install it: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
    return found


class Chromium:
    """One headless Chromium with one page of ``width`` x ``height`` pixels; a context
    manager that ends the browser (and only it) on exit."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        arguments = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile.name}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # The browser reads commands on fd 3 (our stdin pipe) and answers on fd 4 (our stdout).
        self.process = subprocess.Popen(
            [
                "sh",
                "-c",
                'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null',
                executable,
                *arguments,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.buffer = b""
        self.next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
            session=True,
        )

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close", timeout=10)
            except (OSError, RuntimeError, TimeoutError):
                self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.profile.cleanup()

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        """Send one DevTools command (to the page when ``session``) and return its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.process.stdin.write(json.dumps(message).encode() + b"\0")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            fd = self.process.stdout.fileno()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        """Load ``url`` in the page afresh (a new document even where only the fragment
        differs from the page shown)."""
        self.call("Page.navigate", url="about:blank", session=True)
        self.call("Page.navigate", url=url, session=True)

    def text(self) -> str:
        """The text the page shows now (``VISIBLE_TEXT``)."""
        result = self.call(
            "Runtime.evaluate", expression=VISIBLE_TEXT, returnByValue=True, session=True
        )
        return result["result"].get("value", "")

    def wait_for(self, expected: list[str], timeout: float = 45) -> str:
        """The page's text once it shows every string of ``expected``; AssertionError naming
        the missing ones (and what it shows) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [item for item in expected if item not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {missing}; it shows: {text[:2000]}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        """The page as a PNG at ``path``."""
        data = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
