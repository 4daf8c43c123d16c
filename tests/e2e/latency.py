"""Labeling latency in a real browser, shared by tests/e2e/test_latency.py and
benchmarks/label_latency.py: from a key press on the Label page to the next sample's id on screen,
to its animation being ready (the main plot shows the new sample and holds its frames), and to the
page being idle again (every plot drawn, no script running).

Times are taken inside the page with ``performance.now()``: a capturing ``keydown`` listener marks
the press and a ``requestAnimationFrame`` loop marks each state as it first appears, so Playwright's
own round trips do not count.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CURRENT = ".st-key-current_sample h4"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'

# Installed before each key press. The main plot is the one in `.st-key-main_plot` (the first
# Plotly plot on the page if there is no such container). "Ready" = its first trace differs from
# the one before the press and its animation frames are loaded; for a figure without frames (a
# series), drawn is ready.
_ARM = """
([current, idle]) => {
  const plot = () => document.querySelector('.st-key-main_plot .js-plotly-plot')
                     || document.querySelector('[data-testid="stMain"] .js-plotly-plot');
  const sig = (gd) => {
    if (!gd || !gd.data || !gd.data.length) return null;
    const t = gd.data[0];  // arrays arrive as {dtype, bdata} objects or plain lists
    return JSON.stringify([t.x, t.y, t.z, gd.layout && gd.layout.meta]);
  };
  const idText = () => { const e = document.querySelector(current); return e ? e.innerText.trim() : null; };
  const gd0 = plot();
  const s = {before: idText(), sig0: sig(gd0), t0: null, id: null, plot: null, idle: null,
             idle_seen_busy: false, newId: null, webgl: 0, plots: 0, done: false};
  window.__lat = s;
  const tick = () => {
    if (s.done) return;
    const now = performance.now();
    if (s.t0 !== null) {
      const text = idText();
      if (s.id === null && text !== null && text !== s.before) { s.id = now - s.t0; s.newId = text; }
      const gd = plot();
      if (s.plot === null && gd && gd._fullLayout && sig(gd) !== null && sig(gd) !== s.sig0) {
        const frames = gd._transitionData && gd._transitionData._frames
                       ? gd._transitionData._frames.length : 0;
        const animated = !!(gd.layout && gd.layout.sliders && gd.layout.sliders.length);
        if (!animated || frames > 0) s.plot = now - s.t0;
      }
      const busy = !document.querySelector(idle);
      if (busy) s.idle_seen_busy = true;
      if (s.idle === null && s.id !== null && s.plot !== null && !busy) s.idle = now - s.t0;
      if (s.id !== null && s.plot !== null && s.idle !== null) {
        s.webgl = document.querySelectorAll('.gl-container canvas, canvas.gl-canvas').length;
        s.plots = document.querySelectorAll('.js-plotly-plot').length;
        s.done = true;
        return;
      }
      if (now - s.t0 > 30000) { s.done = true; return; }
    }
    requestAnimationFrame(tick);
  };
  document.addEventListener('keydown', () => { if (s.t0 === null) s.t0 = performance.now(); },
                            {capture: true, once: true});
  requestAnimationFrame(tick);
}
"""


@dataclass
class Press:
    """One key press: milliseconds to the new id, to the animation ready, to the page idle."""

    before: str
    after: str | None
    id_ms: float | None
    plot_ms: float | None
    idle_ms: float | None
    webgl_canvases: int
    plots: int


@dataclass
class Latency:
    project: str
    presses: list[Press] = field(default_factory=list)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    webgl_warnings: int = 0

    def summary(self) -> dict:
        def stats(key: str) -> dict:
            vals = [getattr(p, key) for p in self.presses if getattr(p, key) is not None]
            if not vals:
                return {"median": None, "max": None, "n": 0}
            return {"median": round(statistics.median(vals), 1), "max": round(max(vals), 1),
                    "n": len(vals)}
        return {"project": self.project, "presses": len(self.presses),
                "id_ms": stats("id_ms"), "plot_ms": stats("plot_ms"), "idle_ms": stats("idle_ms"),
                "webgl_canvases": max((p.webgl_canvases for p in self.presses), default=0),
                "webgl_warnings": self.webgl_warnings,
                "load_average": [round(x, 2) for x in self.load_average]}

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary(), "presses": [asdict(p) for p in self.presses]},
                          indent=1)

    def line(self) -> str:
        s = self.summary()
        return (f"{self.project}: {s['presses']} presses, id median {s['id_ms']['median']} ms "
                f"(max {s['id_ms']['max']}), animation ready median {s['plot_ms']['median']} ms "
                f"(max {s['plot_ms']['max']}), idle median {s['idle_ms']['median']} ms, "
                f"{s['webgl_canvases']} WebGL canvases, {s['webgl_warnings']} WebGL warnings, "
                f"load average {s['load_average']}")


def load_average() -> tuple[float, float, float]:
    try:
        return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])  # type: ignore
    except OSError:
        return (0.0, 0.0, 0.0)


def prepare_project(home: Path, sample: str, *, epochs: int = 2) -> None:
    """Create project ``sample`` from the bundled sample in ``home`` and run round 0 (few epochs)."""
    from speler.config import Config, apply_overrides
    from speler.data.samples import load_sample
    from speler.loop import run_round
    from speler.project import Project, list_projects

    if sample not in list_projects(home):
        Project.create(home, sample, load_sample(sample), config=Config(),
                       meta={"source": f"sample:{sample}"}).close()
    with Project.open(home, sample) as project:
        if project.store.last_done_round() is None:
            run_round(project, config=apply_overrides(project.config, [f"train.epochs={epochs}"]))


def measure(page, url: str, project: str, *, presses: int = 5, key: str = "1",
            timeout_ms: float = 60_000) -> Latency:
    """Open the Label page of ``project`` at ``url`` and label ``presses`` suggestions with ``key``."""
    warnings: list[str] = []
    page.on("console", lambda m: warnings.append(m.text) if "WebGL" in m.text else None)
    page.goto(f"{url}/label?project={project}")
    page.wait_for_selector(CURRENT, timeout=timeout_ms)
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.wait_for_timeout(1000)  # first plots drawn
    out = Latency(project=project, load_average=load_average())
    heading = page.get_by_role("heading", name="Label", exact=True)
    for _ in range(presses):
        heading.click()  # focus on the page, not in a text field, so shortcuts fire
        page.wait_for_selector(IDLE, timeout=timeout_ms)
        page.evaluate(_ARM, [CURRENT, IDLE])
        page.keyboard.press(key)
        page.wait_for_function("window.__lat && window.__lat.done", timeout=timeout_ms)
        s = page.evaluate("window.__lat")
        out.presses.append(Press(before=s["before"], after=s["newId"], id_ms=s["id"],
                                 plot_ms=s["plot"], idle_ms=s["idle"],
                                 webgl_canvases=int(s["webgl"]), plots=int(s["plots"])))
        page.wait_for_selector(IDLE, timeout=timeout_ms)
        time.sleep(0.3)
    out.webgl_warnings = sum("Too many active WebGL contexts" in w for w in warnings)
    return out
