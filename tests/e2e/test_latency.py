"""How long labeling takes in a real browser: key press → next sample's id, → its animation ready,
→ page idle, on the bundled skeleton sample and the series sample. The figures are printed and
written to artifacts/label_latency.json; the speed targets are checked by
benchmarks/label_latency.py, not here (timed asserts flake on a shared machine). This test checks
that every press moved on to a new sample and drew it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latency import measure, prepare_project

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def prepared(app_server):
    for sample in ("synthetic_actions", "basicmotions"):
        prepare_project(app_server.home, sample)
    return app_server


@pytest.mark.parametrize("sample", ["synthetic_actions", "basicmotions"])
def test_label_latency(prepared, page, sample):
    result = measure(page, prepared.url, sample, presses=4)
    print("\n" + result.line())
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / "label_latency.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[sample] = json.loads(result.to_json())
    out.write_text(json.dumps(saved, indent=1))
    assert len(result.presses) == 4
    for p in result.presses:
        assert p.after is not None and p.after != p.before, (p, prepared.log_tail())
        assert p.plot_ms is not None, p
    assert result.webgl_warnings == 0, result.line()
