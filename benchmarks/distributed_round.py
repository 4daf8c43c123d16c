"""A whole round under torchrun, 1 vs 2 processes: what the sharded graph stages give end to end.

Builds a synthetic ntu25 skeleton project (--n clips, --frames frames, --classes classes, --labeled
of them labeled, seeded), copies it once per run, and times ``python -m speler round`` (the
baseline, one process) and ``torchrun --nproc_per_node 2 -m speler round`` on the copies, each
with ``views.network=never`` by default (the round is then the label-free views, their kNN
graphs, their combination and the propagation, every one row-sharded on 2 ranks; ``--network``
adds the judged network: DDP training and sharded embedding too). Every process runs one thread
(OMP_NUM_THREADS=1, what torchrun gives each rank), so the 2-process run has the machine's two
cores where the baseline has one. Printed per run: wall time of the command, the round's own
time and its stage seconds (rank 0's, as the CLI prints them); then whether both rounds'
propagated labels agree and how well each matches the truth on the unlabeled samples (above
4,000 samples the views' PCA is randomized, in one process by ``torch.svd_lowrank`` and on the
ranks by ``views_distributed``'s own, so the graphs, and a few labels, differ). Results go to
benchmarks/results/distributed_round.json.

    .venv/bin/python benchmarks/distributed_round.py --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "distributed_round.json"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _dataset(n: int, frames: int, classes: int, labeled: float, seed: int = 0):
    """Clips whose joints move with a class-dependent frequency and phase, plus noise."""
    from speler.data.layouts import get_layout
    from speler.data.schema import SequenceSet

    rng = np.random.default_rng(seed)
    layout = get_layout("ntu25")
    v = layout.num_joints
    y = rng.integers(0, classes, n)
    t = np.linspace(0, 2 * np.pi, frames, dtype=np.float32)
    freq = 1 + y[:, None, None, None, None] % 4
    phase = (y // 4)[:, None, None, None, None] + rng.normal(0, 0.3, (n, 1, 1, v, 1))
    x = 0.3 * np.sin(freq * t[None, None, :, None, None] + phase)
    x = (x + 0.1 * rng.normal(size=(n, 3, frames, v, 1))).astype(np.float32)
    shown = np.where(rng.random(n) < labeled, y, -1)
    shown[np.unique(y, return_index=True)[1]] = np.unique(y)  # every class labeled once
    return SequenceSet(x=x, ids=np.array([f"c{i:07d}" for i in range(n)]),
                       classes=tuple(f"class{c}" for c in range(classes)), y=shown.astype(np.int64),
                       layout=layout, fps=30.0, y_true=y.astype(np.int64))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT),
                                                                 env.get("PYTHONPATH", "")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, root: Path, name: str, sets: list[str]) -> dict:
    what = ["-m", "speler", "--root", str(root), "round", name, *sets]
    if world == 1:
        cmd = [sys.executable, *what]
    else:
        cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", str(world), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *what]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{world} process(es) failed:\n{done.stderr[-3000:]}")
    m = re.search(r"round 000 done in ([\d.]+) s \(([^)]*)\)", done.stdout)
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(2))}
    return {"world": world, "wall_s": wall, "round_s": float(m.group(1)), "stages": stages,
            "load_before": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--labeled", type=float, default=0.02)
    ap.add_argument("--network", action="store_true", help="train and judge the network too")
    a = ap.parse_args()
    from speler.loop import read_state
    from speler.metrics import label_quality
    from speler.project import Project

    sets = [] if a.network else ["--set", "views.network=never"]
    runs, labels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        Project.create(root, "base", _dataset(a.n, a.frames, a.classes, a.labeled)).close()
        for world in (1, 2):
            name = f"world{world}"
            shutil.copytree(root / "base", root / name)
            runs[world] = _run(world, root, name, sets)
            with Project.open(root, name) as project:
                labels[world] = read_state(project, 0).result.labels
                data = project.data
                runs[world]["quality"] = label_quality(data.y_true, labels[world],
                                                       num_classes=data.num_classes,
                                                       mask=data.y < 0)
    entry = {"n": a.n, "frames": a.frames, "classes": a.classes, "labeled": a.labeled,
             "network": a.network, "runs": {str(w): r for w, r in runs.items()},
             "labels_equal": bool(np.array_equal(labels[1], labels[2])),
             "labels_differing": int((labels[1] != labels[2]).sum()),
             "machine": f"{os.cpu_count()} cores"}
    stages = list(runs[1]["stages"])
    print(f"n={a.n} frames={a.frames} classes={a.classes} network={'judged' if a.network else 'never'};"
          f" load before: {runs[1]['load_before']:.2f} / {runs[2]['load_before']:.2f}")
    print(f"{'':<16}{'1 process s':>12}{'2 processes s':>15}{'speed-up':>10}")
    for key, one, two in [("command (wall)", runs[1]["wall_s"], runs[2]["wall_s"]),
                          ("round", runs[1]["round_s"], runs[2]["round_s"])] + [
            (s, runs[1]["stages"][s], runs[2]["stages"].get(s, float("nan"))) for s in stages]:
        print(f"{key:<16}{one:>12.1f}{two:>15.1f}{one / two if two else float('nan'):>10.2f}")
    print(f"propagated labels equal: {entry['labels_equal']} "
          f"({entry['labels_differing']} of {a.n} differ); on the unlabeled samples' truth: "
          + "; ".join(f"{w} process{'es' if w > 1 else ''} accuracy "
                      f"{runs[w]['quality']['accuracy']:.4f}, macro-F1 "
                      f"{runs[w]['quality']['macro_f1']:.4f}" for w in (1, 2)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[f"{a.n}{'-network' if a.network else ''}"] = entry
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
