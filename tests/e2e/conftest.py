"""Browser test fixtures: `streamlit run app/main.py` on a free localhost port with a temporary
SPELER_HOME, and Debian's chromium driven by Playwright (sync API)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "artifacts" / "screenshots"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]


@dataclass
class Server:
    url: str
    home: Path
    log: Path
    proc: subprocess.Popen

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path, log: Path, *, annotator: str) -> tuple[subprocess.Popen, str]:
    """`streamlit run app/main.py` on a free localhost port with projects in ``home``, its output
    in ``log``; returns (process, url) once /_stcore/health answers. RuntimeError (naming the log)
    if it exits or stays silent for 90 s; the process is stopped then."""
    port = _free_port()
    env = {**os.environ, "SPELER_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "SPELER_ANNOTATOR": annotator}
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py"),
           "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.time() > deadline:
            stop_app(proc)
            raise RuntimeError(f"streamlit did not answer on {url} in 90 s; see {log}")
        time.sleep(0.3)


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The app served by a real `streamlit run`, killed after the module."""
    home = tmp_path_factory.mktemp("speler_home")
    log = tmp_path_factory.mktemp("streamlit_log") / "server.log"
    try:
        proc, url = start_app(home, log, annotator="browser-test")
    except RuntimeError as exc:
        pytest.fail(f"{exc}:\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}")
    server = Server(url=url, home=home, log=log, proc=proc)
    try:
        yield server
    finally:
        stop_app(proc)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) "
                    "to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()
