"""Open a flow run in the Prefect UI with headless Chromium: screenshots and rendered DOM.

    python tools/ui_check.py --url http://127.0.0.1:4200 --flow-run ID --out DIR

For each page (the flow run page, its Artifacts tab, and one page per keyed artifact, in the
default UI (v1, served at `/`) and in the new UI (v2, served at `/v2`)) it writes DIR/<page>.png
(a full-page screenshot), DIR/<page>.html (the DOM after the SPA rendered it) and, for all pages,
DIR/report.json: the page's URL, its visible text, every <img> with the start of its src,
whether it loaded and its natural size, and every <table>'s headers and cells. One progress
artifact (the synthesis stage's, if any) is shown on its task run's Artifacts tab and on its own
page. The exit status is 0 when every page became ready (see `Page.ready`) and every data: image
on them decoded.

The browser is driven over the Chrome DevTools Protocol (`--remote-debugging-port`) with the
`websockets` package Prefect already depends on; `--dump-dom` alone cannot tell whether an
image decoded, nor wait for the SPA's API calls.

URL paths of the bundled Prefect 3.9.1 UIs (from their route tables):
    v1: /runs/flow-run/<id>[?tab=Artifacts]   /artifacts/artifact/<id>   /artifacts/key/<key>
    v2: /v2/runs/flow-run/<id>[?tab=Artifacts] /v2/artifacts/artifact/<id> /v2/artifacts/key/<key>
The server answers a navigation to `/` with a redirect to the default UI (v2 unless
PREFECT_SERVER_UI_V2_ENABLED=false); deep links to v1 paths are served as they are.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
UIS = {"v1": "", "v2": "/v2"}


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------
# A minimal CDP client: one page target, synchronous calls.


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium with one page, driven over the DevTools Protocol."""

    def __init__(self, binary: str | None = None, width: int = 1440, height: int = 1000):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError("no Chromium binary (set $CHROMIUM or install chromium)")
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        self.console: list[str] = []

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self._profile = tempfile.mkdtemp(prefix="ui-check-chromium-")
        self._log = open(Path(self._profile) / "chromium.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            port = self._devtools_port(timeout=60)
            ws_url = self._page_ws(port, timeout=30)
            self.ws = connect(ws_url, max_size=None, open_timeout=30)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self._viewport(self.height)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _chromium_log(self) -> str:
        self._log.flush()
        return (Path(self._profile) / "chromium.log").read_text()[-4000:]

    def _devtools_port(self, timeout: float) -> int:
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited ({self.proc.returncode}):\n{self._chromium_log()}")
            if port_file.exists():
                lines = port_file.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise CDPError(f"chromium did not open a DevTools port:\n{self._chromium_log()}")

    def _page_ws(self, port: int, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.2)
        raise CDPError("no page target in chromium")

    def call(self, method: str, timeout: float = 60, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise CDPError(f"{method}: no answer in {timeout} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            self.console.append(f"console.{p['type']}: {args[:300]}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = d.get("exception", {}).get("description") or d.get("text", "")
            self.console.append(f"exception: {text[:300]}")

    def evaluate(self, expression: str):
        res = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise CDPError(f"evaluate {expression[:80]!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def goto(self, url: str) -> None:
        res = self.call("Page.navigate", url=url)
        if res.get("errorText"):
            raise CDPError(f"navigate {url}: {res['errorText']}")

    def wait_for(self, expression: str, timeout: float, poll: float = 0.25) -> bool:
        """Poll a JS expression until it is truthy; False after `timeout` s."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(CDPError):  # e.g. during a navigation
                if self.evaluate(expression):
                    return True
            time.sleep(poll)
        return False

    def settle(self, quiet: float = 1.0, timeout: float = 15) -> None:
        """Wait until the page's text and image count stop changing for `quiet` s."""
        probe = "document.body ? document.body.innerText.length + ':' + document.images.length : ''"
        last, since, deadline = None, time.time(), time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(CDPError):
                now = self.evaluate(probe)
                if now != last:
                    last, since = now, time.time()
                elif time.time() - since >= quiet:
                    return
            time.sleep(0.2)

    def screenshot(self, path: Path, max_height: int = 6000) -> None:
        """The whole page, not only the viewport, up to max_height CSS pixels.

        The v1 UI scrolls inside an element, not the document, so the viewport is first made as
        tall as the tallest scrollable content, then restored."""
        tallest = self.evaluate(
            "Math.max(document.documentElement.scrollHeight,"
            " ...Array.from(document.querySelectorAll('*'), e => e.scrollHeight))"
        )
        height = min(max(self.height, int(tallest or 0)), max_height)
        self._viewport(height)
        try:
            time.sleep(0.5)  # let the layout and lazy content follow the new size
            m = self.call("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m["contentSize"]
            height = min(max(height, int(size["height"])), max_height)
            shot = self.call(
                "Page.captureScreenshot",
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1},
            )
        finally:
            self._viewport(self.height)
        path.write_bytes(base64.b64decode(shot["data"]))

    def _viewport(self, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )


# ------------------------------------------------------------------------------------------
# The pages of one flow run.

CLICK_TAB_JS = """(() => {
    const tab = Array.from(document.querySelectorAll('[role=tab], .p-tab'))
        .find(e => e.innerText.trim() === %s);
    if (tab) tab.click();
    return !!tab;
})()"""

IMAGES_JS = """Array.from(document.images).map(i => ({
    src: i.getAttribute('src') ? i.getAttribute('src').slice(0, 40) : '',
    src_length: (i.getAttribute('src') || '').length,
    alt: i.alt, complete: i.complete,
    natural_width: i.naturalWidth, natural_height: i.naturalHeight,
    width: i.width, height: i.height}))"""

TABLES_JS = """Array.from(document.querySelectorAll('table'), t => ({
    headers: Array.from(t.querySelectorAll('th'), th => th.innerText.trim()),
    rows: Array.from(t.querySelectorAll('tbody tr'),
        tr => Array.from(tr.querySelectorAll('td'), td => td.innerText.trim()))}))"""


@dataclass
class Page:
    name: str
    url: str
    wait_text: list[str]  # the page is ready when its text contains all of these
    need_images: bool = False  # ... and (if set) some data: <img> has decoded
    # A tab to click once wait_text[0] shows: v1 drops `?tab=` while the run is loading.
    tab: str | None = None
    ready: bool = False
    seconds: float = 0.0
    text: str = ""
    images: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # {"headers": [...], "rows": [[...]]}
    png: str = ""
    html: str = ""
    console: list[str] = field(default_factory=list)

    @property
    def ready_js(self) -> str:
        cond = [f"document.body.innerText.includes({json.dumps(t)})" for t in self.wait_text]
        if self.need_images:
            cond.append(
                "Array.from(document.images).some(i => i.getAttribute('src')"
                ".startsWith('data:image/') && i.complete && i.naturalWidth > 0)"
            )
        return "!!document.body && " + (" && ".join(cond) or "true")


def _api(api_url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{api_url}{path}",
        data=data,
        method="GET" if body is None else "POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def flow_run_pages(
    url: str, flow_run_id: str, api_url: str | None = None, uis: tuple[str, ...] = ("v1", "v2")
) -> list[Page]:
    """The pages to open, with what each must show, from the flow run and its artifacts."""
    url = url.rstrip("/")
    api_url = (api_url or f"{url}/api").rstrip("/")
    run = _api(api_url, f"/flow_runs/{flow_run_id}")
    arts = _api(api_url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keyed = sorted((a for a in arts if a.get("key")), key=lambda a: a["key"])
    state = run["state"]["name"] if run.get("state") else ""
    progress = [a for a in arts if a["type"] == "progress" and a.get("task_run_id")]
    progress.sort(key=lambda a: not (a.get("description") or "").startswith("synthesis"))
    task_run = _api(api_url, f"/task_runs/{progress[0]['task_run_id']}") if progress else None
    pages = []
    for ui in uis:
        base = url + UIS[ui]
        pages.append(
            Page(f"{ui}-flow-run", f"{base}/runs/flow-run/{run['id']}", [run["name"], state])
        )
        pages.append(
            Page(
                f"{ui}-flow-run-artifacts",
                f"{base}/runs/flow-run/{run['id']}?tab=Artifacts",
                [run["name"], *(a["key"] for a in keyed)],
                tab="Artifacts",
            )
        )
        for a in keyed:
            pages.append(
                Page(
                    f"{ui}-artifact-{a['key']}",
                    f"{base}/artifacts/artifact/{a['id']}",
                    [a["key"]],
                    need_images="data:image/" in str(a.get("data")),
                )
            )
        if task_run:  # a task run's progress artifact: on its page, and on its own page
            desc = [d for d in [progress[0].get("description")] if d]
            pages.append(
                Page(
                    f"{ui}-task-run-artifacts",
                    f"{base}/runs/task-run/{task_run['id']}?tab=Artifacts",
                    [task_run["name"], *desc],
                    tab="Artifacts",
                )
            )
            pages.append(
                Page(
                    f"{ui}-artifact-progress",
                    f"{base}/artifacts/artifact/{progress[0]['id']}",
                    desc,
                )
            )
    return pages


def capture(
    browser: Browser, page: Page, out: Path, timeout: float = 60, quiet: float = 1.0
) -> Page:
    """Open one page, wait until it is ready and quiet, save its screenshot and DOM."""
    t0 = time.time()
    browser.console.clear()
    browser.goto(page.url)
    deadline = time.time() + timeout
    if page.tab:
        first = Page("", "", page.wait_text[:1]).ready_js
        browser.wait_for(first, timeout)
        browser.wait_for(CLICK_TAB_JS % json.dumps(page.tab), max(1.0, deadline - time.time()))
    page.ready = browser.wait_for(page.ready_js, max(1.0, deadline - time.time()))
    browser.settle(quiet=quiet)
    page.seconds = round(time.time() - t0, 2)
    page.text = browser.evaluate("document.body ? document.body.innerText : ''") or ""
    page.images = browser.evaluate(IMAGES_JS) or []
    page.tables = browser.evaluate(TABLES_JS) or []
    html = browser.evaluate("document.documentElement.outerHTML") or ""
    out.mkdir(parents=True, exist_ok=True)
    png, dom = out / f"{page.name}.png", out / f"{page.name}.html"
    browser.screenshot(png)
    dom.write_text(html)
    page.png, page.html = str(png), str(dom)
    page.console = list(browser.console)
    return page


def check(
    url: str,
    flow_run_id: str,
    out: Path,
    api_url: str | None = None,
    uis: tuple[str, ...] = ("v1", "v2"),
    timeout: float = 60,
    chromium: str | None = None,
    width: int = 1440,
    height: int = 1000,
) -> dict[str, Page]:
    """Screenshot and DOM of every page of the flow run; also written to out/report.json."""
    out = Path(out)
    pages = flow_run_pages(url, flow_run_id, api_url, uis)
    with Browser(chromium, width, height) as browser:
        for page in pages:
            capture(browser, page, out, timeout)
        version = browser.evaluate("navigator.userAgent")
    report = {"user_agent": version, "pages": [asdict(p) for p in pages]}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return {p.name: p for p in pages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the UI's URL, e.g. http://127.0.0.1:4200")
    ap.add_argument("--flow-run", required=True, help="flow run id")
    ap.add_argument("--out", required=True, type=Path, help="folder for PNG/HTML/report.json")
    ap.add_argument("--api-url", help="the API's URL (default: URL/api)")
    ap.add_argument("--ui", choices=["v1", "v2", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per page")
    ap.add_argument("--chromium", help="the browser binary (default: $CHROMIUM or on PATH)")
    ap.add_argument("--size", default="1440x1000", help="viewport WIDTHxHEIGHT")
    args = ap.parse_args(argv)
    uis = ("v1", "v2") if args.ui == "both" else (args.ui,)
    width, height = (int(v) for v in args.size.split("x"))
    binary = args.chromium or find_chromium()
    if not binary:
        print("no Chromium binary found (install chromium or set $CHROMIUM)", file=sys.stderr)
        return 2
    print(chromium_version(binary))
    pages = check(
        args.url, args.flow_run, args.out, args.api_url, uis, args.timeout, binary, width, height
    )
    ok = True
    for p in pages.values():
        loaded = [i for i in p.images if i["src"].startswith("data:")]
        bad = [i for i in loaded if not i["natural_width"]]
        good = p.ready and not bad
        ok &= good
        imgs = f", data: images {len(loaded) - len(bad)}/{len(loaded)} loaded" if loaded else ""
        print(
            f"{'ok ' if good else 'BAD'} {p.name}: {'ready' if p.ready else 'NOT ready'} "
            f"in {p.seconds} s{imgs} -> {p.png}\n    {p.url}"
        )
        for line in p.console[:5]:
            print(f"    {line}")
    print(f"report: {args.out / 'report.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
