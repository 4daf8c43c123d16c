"""The command line: main([...]) exit codes and output; a real ``python -m speler`` import."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factories import interrupt_rmtree

from speler.cli import main
from speler.project import Project

REPO = Path(__file__).resolve().parents[1]
BASICMOTIONS = REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def class_rows(out: str, classes) -> dict[str, list[int]]:
    """Rows of the per-class table printed by ``info``: name -> the numbers after it."""
    rows = {}
    for line in out.splitlines():
        for name in list(classes) + ["total"]:
            if line.startswith(name + " ") and re.fullmatch(r"\s*[\d\s]+", line[len(name):]):
                rows[name] = [int(v) for v in line[len(name):].split()]
    return rows


@pytest.fixture
def project(tmp_path, skeleton_set):
    Project.create(tmp_path, "demo", skeleton_set, preprocess=False).close()
    return tmp_path


# -- label / undo / info on a project ------------------------------------------------------------
def test_label_undo_and_info_counts(capsys, project, skeleton_set):
    code, out, err = run(capsys, "--root", project, "label", "demo", "skel_005", "action3",
                         "--annotator", "ann")
    assert code == 0, err
    assert out.strip() == "skel_005: action3 (was no label)"
    code, out, _ = run(capsys, "--root", project, "label", "demo", "skel_000", "action1")
    assert code == 0 and "(was action0 (imported))" in out

    code, out, err = run(capsys, "--root", project, "info", "demo")
    assert code == 0, err
    rows = class_rows(out, skeleton_set.classes)
    y, y_true = skeleton_set.y.copy(), skeleton_set.y_true
    human = np.zeros(4, int)
    human[[3, 1]] = 1
    y[[0, 5]] = -1  # now human, no longer imported
    imported = np.bincount(y[y >= 0], minlength=4)
    unlabeled_true = np.bincount(y_true[(skeleton_set.y < 0) & (np.arange(40) != 5)], minlength=4)
    for c, name in enumerate(skeleton_set.classes):
        assert rows[name] == [human[c], imported[c], 0, unlabeled_true[c]], name
    assert rows["total"] == [2, imported.sum(), 0, unlabeled_true.sum()]
    assert "layout    ntu25 (25 joints)" in out
    assert "N=40 C=3 T=16 V=25 M=2" in out
    assert "rounds    none yet" in out

    code, out, _ = run(capsys, "--root", project, "undo", "demo")
    assert code == 0 and out.strip() == "undid skel_000: action1; now action0 (imported)"
    code, out, _ = run(capsys, "--root", project, "undo", "demo", "--annotator", "ann")
    assert code == 0 and out.strip() == "undid skel_005: action3; now no label"
    code, out, _ = run(capsys, "--root", project, "undo", "demo")
    assert code == 0 and out.strip() == "nothing to undo"


def test_label_without_user_variables_names_the_login(capsys, project, monkeypatch):
    """A shell without $USER (root in a container) still records who labeled: the password
    database's name for this uid."""
    import pwd

    from speler.store import LabelStore

    for var in ("SPELER_ANNOTATOR", "LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run(capsys, "--root", project, "label", "demo", "skel_005", "action3")
    assert code == 0, err
    monkeypatch.setenv("SPELER_ANNOTATOR", "ada")
    code, _, err = run(capsys, "--root", project, "label", "demo", "skel_006", "action3")
    assert code == 0, err
    with LabelStore.open(project / "demo" / "store.sqlite") as store:
        who = {e.sample_id: e.annotator for e in store.events() if e.source == "human"}
    try:
        login = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a password entry: nobody to name
        login = ""
    assert who == {"skel_005": login, "skel_006": "ada"}


def test_info_shows_rounds(capsys, project):
    with Project.open(project, "demo") as p:
        r = p.store.begin_round()
        p.store.write_round_propagation(r, np.zeros(40, dtype=np.int64), np.zeros(40),
                                        np.zeros(40), metrics={}, config={})
        p.store.fail_round(p.store.begin_round(), "ran out of memory")
    code, out, _ = run(capsys, "--root", project, "info", "demo")
    assert code == 0
    assert "rounds    2 (last done: 0)" in out
    assert re.search(r"001  failed .* — ran out of memory", out)
    rows = class_rows(out, ["action0"])
    assert rows["total"][2] == 40 - rows["total"][1]  # every non-imported sample propagated


# -- bad input: exit 2 and one line saying what and where -----------------------------------------
def test_missing_project(capsys, tmp_path):
    code, out, err = run(capsys, "--root", tmp_path, "info", "ghost")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "no project 'ghost'" in line and str(tmp_path) in line


def test_unknown_label_and_id(capsys, project):
    code, _, err = run(capsys, "--root", project, "label", "demo", "skel_001", "dance")
    assert code == 2
    line = one_error_line(err)
    assert "unknown class 'dance'" in line and "store.sqlite" in line and "action0" in line
    code, _, err = run(capsys, "--root", project, "label", "demo", "nobody", "action0")
    assert code == 2
    assert "unknown sample id 'nobody'" in one_error_line(err)
    with Project.open(project, "demo") as p:
        assert [e.source for e in p.store.events()] == ["imported"] * int((p.data.y >= 0).sum())


def test_root_and_verbose_also_after_the_command(capsys, project, tmp_path):
    code, out, err = run(capsys, "info", "demo", "--root", project)
    assert code == 0, err
    assert "N=40 C=3 T=16 V=25 M=2" in out
    code, out, err = run(capsys, "--root", project, "info", "demo", "-v")  # the first --root kept
    assert code == 0 and "N=40" in out, err
    from speler.cli import build_parser

    assert build_parser().parse_args(["info", "x", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "info", "x"]).verbose is True
    assert build_parser().parse_args(["info", "x"]).verbose is False
    code, _, err = run(capsys, "--root", tmp_path / "elsewhere", "info", "demo", "--root", project)
    assert code == 0, err  # the one nearest the project wins, as a user reads it


@pytest.mark.parametrize("argv, option, says", [
    (["suggest", "demo", "-n", "0"], "-n", "must be at least 1, got 0"),
    (["suggest", "demo", "-n", "-3"], "-n", "must be at least 1, got -3"),
    (["suggest", "demo", "-n", "two"], "-n", "expected a whole number, got 'two'"),
    (["doubts", "demo", "--top", "0"], "--top", "must be at least 1, got 0"),
])
def test_counts_below_their_minimum_are_usage_errors(capsys, project, argv, option, says):
    """``suggest -n 0`` said "every sample has a human label"; ``-n -3`` named the library's
    'budget'."""
    code, out, err = run(capsys, "--root", project, *argv)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert f"argument {option}" in line and says in line, line


def test_usage_errors_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "--root", tmp_path, "import", "x.ts")
    assert code == 2 and "--project" in one_error_line(err)
    code, _, err = run(capsys, "--root", tmp_path, "import", "--project", "p")
    assert code == 2 and "exactly one of PATH or --sample" in one_error_line(err)
    code, _, err = run(capsys, "--root", tmp_path, "import", "x.ts", "--project", "p",
                       "--protocol-imbalance", "10")
    assert code == 2 and "go together" in one_error_line(err)
    code, _, err = run(capsys, "--root", tmp_path, "import", "x.ts", "--project", "../p")
    assert code == 2 and "invalid project name" in one_error_line(err)
    code, _, err = run(capsys, "--root", tmp_path, "import", "x.ts", "--project", "p",
                       "--set", "train.nope=1")
    assert code == 2 and "train.nope" in one_error_line(err)
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "frobnicate" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_import_existing_project_refused_before_reading(capsys, project):
    code, _, err = run(capsys, "--root", project, "import", "/no/such/file.ts", "--project", "demo")
    assert code == 2 and "already exists" in one_error_line(err)


def test_import_missing_and_corrupt_files(capsys, tmp_path):
    root = tmp_path / "root"
    code, _, err = run(capsys, "--root", root, "import", tmp_path / "absent.ts", "--project", "p")
    assert code == 2 and "absent.ts" in one_error_line(err)
    bad = tmp_path / "broken.ts"
    bad.write_text("@problemName broken\n@classLabel true a b\n@data\n1,2,3:a\nnot,numbers:zz\n")
    code, _, err = run(capsys, "--root", root, "import", bad, "--project", "p")
    assert code == 2 and "broken.ts" in one_error_line(err)
    garbage = tmp_path / "a01_s01_e01_skeleton3D.txt"
    garbage.write_bytes(b"\x00\x01garbage\xff" * 50)
    code, _, err = run(capsys, "--root", root, "import", garbage, "--project", "p")
    assert code == 2 and "a01_s01_e01_skeleton3D.txt" in one_error_line(err)
    assert not root.exists() or list(root.iterdir()) == []


# -- import of real files ------------------------------------------------------------------------
def test_import_basicmotions_with_label_csv(capsys, tmp_path):
    if not BASICMOTIONS.is_file():
        pytest.skip(f"bundled BasicMotions sample missing at {BASICMOTIONS}")
    code, out, err = run(capsys, "--root", tmp_path, "import", BASICMOTIONS, "--project", "bm",
                         "--frames", "50")
    assert code == 0, err
    with Project.open(tmp_path, "bm") as p:
        ids, classes, y = p.data.ids, p.data.classes, p.data.y
        assert p.data.shape[2] == 50 and (y >= 0).all()
        assert (p.store.human_labels() == y).all()

    csv = tmp_path / "mine.csv"
    csv.write_text("id,label\n" + f"{ids[0]},{classes[1]}\n{ids[3]},{classes[0]}\n"
                   f"{ids[0]},{classes[1]}\n")
    code, out, err = run(capsys, "--root", tmp_path, "import", BASICMOTIONS, "--project", "bm2",
                         "--no-file-labels", "--labels", csv)
    assert code == 0, err
    assert "note: " in err and "mine.csv" in err and "repeats" in err  # reported, not dropped
    with Project.open(tmp_path, "bm2") as p:
        h = p.store.human_labels()
        assert h[0] == 1 and h[3] == 0 and (np.delete(h, [0, 3]) == -1).all()
        np.testing.assert_array_equal(p.data.y_true, y)  # file labels kept as hidden truth
    # with the file labels in force, a CSV label that contradicts one is kept and said
    assert y[0] != 1 and y[3] == 0
    code, out, err = run(capsys, "--root", tmp_path, "import", BASICMOTIONS, "--project", "bm4",
                         "--labels", csv)
    assert code == 0, err
    assert (f"note: {csv}: 1 of its labels replace a different label that the data files give "
            f"(the CSV's are kept): {ids[0]}: {classes[y[0]]} -> {classes[1]}\n") in err
    with Project.open(tmp_path, "bm4") as p:
        assert p.store.human_labels()[0] == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n" + f"{ids[0]},NotAClass\nnobody,{classes[0]}\n")
    code, _, err = run(capsys, "--root", tmp_path, "import", BASICMOTIONS, "--project", "bm3",
                       "--labels", bad)
    assert code == 2
    line = one_error_line(err)
    assert "bad.csv" in line and ("NotAClass" in line or "nobody" in line)
    assert not (tmp_path / "bm3").exists()


def test_import_with_protocol(capsys, tmp_path, shared_data):
    src = shared_data / "MSRAction3D"
    code, out, err = run(capsys, "--root", tmp_path, "import", src, "--project", "lt",
                         "--protocol-imbalance", "10", "--protocol-labeled", "0.1",
                         "--protocol-seed", "3", "--frames", "24")
    assert code == 0, err
    with Project.open(tmp_path, "lt") as p:
        d = p.data
        counts = np.bincount(d.y_true, minlength=d.num_classes)
        assert counts.max() / counts.min() == pytest.approx(10, rel=0.25)
        labeled = p.store.human_labels() >= 0
        assert 0.05 < labeled.mean() < 0.2 and (np.bincount(d.y_true[labeled]) >= 1).all()
        assert d.shape[2] == 24


def test_python_m_speler_import_and_info_on_msraction3d(tmp_path, shared_data):
    """The real command line in a subprocess, on the real MSR Action3D files."""
    src = shared_data / "MSRAction3D"
    env = {**os.environ, "SPELER_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "speler", "import", str(src), "--project", "msr"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "567 samples, 20 classes, 567 labeled" in res.stdout
    res = subprocess.run([sys.executable, "-m", "speler", "info", "msr"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with Project.open(tmp_path / "home", "msr") as p:
        classes = p.data.classes
    rows = class_rows(res.stdout, classes)
    assert len(rows) == 21, res.stdout
    imported = sorted(rows[c][1] for c in classes)
    # Per-class counts from the dataset's SOURCE.md: a15 20, a04-a06 26, a01-a03 27, a07 28, rest 30.
    assert imported == sorted([20] + [26] * 3 + [27] * 3 + [28] + [30] * 12)
    assert all(rows[c][0] == 0 and rows[c][2] == 0 for c in classes)
    assert rows["total"][:3] == [0, 567, 0]
    assert "layout    msr_action3d (20 joints)" in res.stdout
    assert "N=567" in res.stdout and "V=20" in res.stdout


def test_ctrl_c_during_import_leaves_nothing_half_written(tmp_path, shared_data):
    """SIGINT the moment the project's temporary folder appears: exit 130, and the root holds
    either nothing or (if the rename won the race) a complete project, never a partial one."""
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "speler", "--root", str(root), "import",
           str(shared_data / "MSRAction3D"), "--project", "msr"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = False
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir()):
            proc.send_signal(signal.SIGINT)
            sent = True
            break
        time.sleep(0.001)
    out, err = proc.communicate(timeout=120)
    if not sent:
        pytest.skip("the import finished before its temporary folder was seen")
    assert "Traceback" not in err
    leftovers = sorted(p.name for p in root.iterdir())
    if proc.returncode == 130:
        assert err.strip().splitlines()[-1].startswith("error: interrupted")
        assert leftovers in ([], ["msr"])
    else:
        assert proc.returncode == 0 and leftovers == ["msr"]
    if leftovers:
        with Project.open(root, "msr") as p:
            assert p.data.n == 567 and (p.store.human_labels() >= 0).sum() == 567


def test_samples_and_import_of_a_bundled_sample(capsys, tmp_path):
    from speler.data.samples import list_samples

    code, out, _ = run(capsys, "samples")
    assert code == 0
    for info in list_samples():
        assert re.search(rf"^{info.name}\s+{info.kind}\s+", out, re.M), info.name
    code, out, err = run(capsys, "--root", tmp_path, "import", "--sample", "basicmotions",
                         "--project", "bm", "--frames", "32")
    assert code == 0, err
    with Project.open(tmp_path, "bm") as p:
        assert p.store.meta["source"] == "sample:basicmotions"
        assert p.data.shape[2] == 32 and p.data.layout.is_series
        np.testing.assert_array_equal(p.store.human_labels(), p.data.y)
        assert 0 < (p.data.y >= 0).sum() < p.data.n and p.data.y_true is not None
    code, _, err = run(capsys, "--root", tmp_path, "import", "--sample", "nope", "--project", "x")
    assert code == 2 and "unknown sample 'nope'" in one_error_line(err)


# -- faults: one error line, nothing saved is lost --------------------------------------------------
@pytest.mark.parametrize("content", [b"[]", b"\xff\xfe\x00\x01garbage\x80"], ids=["list", "binary"])
def test_damaged_config_json_is_one_error_line(capsys, project, content):
    (project / "demo" / "config.json").write_bytes(content)
    for argv in (["info", "demo"], ["label", "demo", "skel_005", "action3"], ["undo", "demo"],
                 ["export", "demo"]):
        code, out, err = run(capsys, "--root", project, *argv)
        assert code == 2 and out == "", argv
        line = one_error_line(err)
        assert "demo/config.json: invalid project config" in line, line


def test_commands_refuse_project_paths(capsys, tmp_path, skeleton_set):
    """A name that is a path would open (and write) a project outside the projects folder."""
    Project.create(tmp_path / "other", "demo", skeleton_set, preprocess=False).close()
    root = tmp_path / "root"
    root.mkdir()
    for argv in (["label", "../other/demo", "skel_005", "action3"],
                 ["info", str(tmp_path / "other" / "demo")], ["undo", "../other/demo"],
                 ["export", "../other/demo"], ["round", "../other/demo"],
                 ["suggest", "../other/demo"], ["doubts", "../other/demo"],
                 ["propagate", "../other/demo"], ["train", "../other/demo"]):
        code, out, err = run(capsys, "--root", root, *argv)
        assert code == 2 and out == "", argv
        assert "invalid project name" in one_error_line(err), argv
    with Project.open(tmp_path / "other", "demo") as p:
        assert "human" not in {e.source for e in p.store.events()}
    assert not (tmp_path / "other" / "demo" / "exports" / "demo-labels.csv").exists()


def test_ctrl_c_while_overwrite_deletes_the_old_project_says_where_it_is(capsys, project,
                                                                        monkeypatch):
    code, _, err = run(capsys, "--root", project, "label", "demo", "skel_005", "action3")
    assert code == 0, err
    interrupt_rmtree(monkeypatch, ".old-demo-")
    code, _, err = run(capsys, "--root", project, "import", "--sample", "basicmotions",
                       "--project", "demo", "--overwrite")
    monkeypatch.undo()
    assert code == 130
    line = one_error_line(err)
    old = [q for q in project.iterdir() if q.name.startswith(".old-demo-")]
    assert len(old) == 1 and str(old[0]) in line and "nothing was half-written" not in line, line
    from speler.store import LabelStore

    with LabelStore.open(old[0] / "store.sqlite") as s:
        assert s.label_of("skel_005") == (3, "human")


_CTRL_C_ON_IMPORT = """
import builtins, os, runpy, signal, sys
target = sys.argv.pop(1)
real = builtins.__import__

def hook(name, *args, **kwargs):
    if name == target:
        builtins.__import__ = real
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)

builtins.__import__ = hook
runpy.run_module("speler", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["numpy", "speler.selection"],
                         ids=["importing-the-cli", "building-the-parser"])
def test_ctrl_c_in_the_first_seconds_exits_130_quietly(tmp_path, module):
    """SIGINT while ``python -m speler`` still imports numpy, or builds its parser (which imports
    torch): exit 130 with at most one line, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", _CTRL_C_ON_IMPORT, module, "--root",
                          str(tmp_path), "info", "x"], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=env)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), res.stderr


def test_import_frames_are_bounded_before_reading(capsys, tmp_path):
    root = tmp_path / "root"
    for extra in (["--frames", "100000000"], ["--frames", "2000000"],
                  ["--set", "preprocess.frames=20000"]):
        code, out, err = run(capsys, "--root", root, "import", tmp_path / "never-read.ts",
                             "--project", "p", *extra)
        assert code == 2 and out == "", extra
        line = one_error_line(err)
        assert "frames must be 0 (by the data) or between 2 and 10000" in line \
            and "never-read" not in line, line
    assert not root.exists() or list(root.iterdir()) == []


def test_info_shows_a_killed_round_as_interrupted(capsys, project):
    script = ("import os, signal, sys\nfrom speler.project import Project\n"
              "p = Project.open(sys.argv[1], 'demo')\np.store.begin_round()\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", script, str(project)], capture_output=True,
                         text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert res.returncode == -9, res.stderr
    code, out, err = run(capsys, "--root", project, "info", "demo")
    assert code == 0, err
    assert re.search(r"000  interrupted  started .* — process \d+ that ran it has ended", out), out
    assert "running" not in out


# -- issue 13: what the commands print ------------------------------------------------------------
def test_info_names_a_series_by_its_channels_and_rounds_the_frame_rate(capsys, tmp_path, series_set):
    Project.create(tmp_path, "ser", series_set.replace(fps=18.947368), preprocess=False).close()
    code, out, err = run(capsys, "--root", tmp_path, "info", "ser")
    assert code == 0, err
    assert "layout    series, 3 channels, 18.9 fps\n" in out
    assert "joints" not in out


def test_output_cut_off_by_the_reader_exits_quietly(project):
    """`info demo | head -1`: the reader closes the pipe; no 'Broken pipe' error, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "speler", "--root", str(project), "info", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    proc.stdout.close()  # before anything was written: every write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and err == ""


def test_pyskl_export_of_a_series_project_names_the_target_and_why(capsys, tmp_path, series_set):
    Project.create(tmp_path, "ser", series_set, preprocess=False).close()
    out_file = tmp_path / "out" / "ser.pkl"
    code, out, err = run(capsys, "--root", tmp_path, "export", "ser", "--format", "pyskl",
                         "--out", out_file)
    assert code == 2
    line = one_error_line(err)
    assert str(out_file) in line and ".tmp" not in line
    assert "PYSKL pickles hold skeleton keypoints" in line and "csv, json or npz" in line
    assert not out_file.exists() and not list(out_file.parent.glob(".*"))


def test_label_csv_for_unlabeled_data_names_allow_new_classes(capsys, tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(12, 3, 20)).astype(np.float32))
    csv = tmp_path / "mine" / "my_labels.csv"  # not beside x.npy, where the reader looks itself
    csv.parent.mkdir()
    csv.write_text("id,label\nx#0,walk\nx#1,run\n")
    code, _, err = run(capsys, "--root", tmp_path, "import", data, "--project", "npy",
                       "--labels", csv)
    assert code == 2
    line = one_error_line(err)
    assert "unknown class 'walk'" in line and "--allow-new-classes" in line
    code, _, err = run(capsys, "--root", tmp_path, "import", data, "--project", "npy",
                       "--labels", csv, "--allow-new-classes")
    assert code == 0, err


def test_train_without_labels_names_the_project(capsys, tmp_path, skeleton_set):
    Project.create(tmp_path, "none", skeleton_set.replace(y=np.full(skeleton_set.n, -1)),
                   preprocess=False).close()
    code, out, err = run(capsys, "--root", tmp_path, "train", "none")
    assert code == 2 and out == ""
    assert one_error_line(err) == ("error: project none: no labels yet to train on; label a few "
                                   "samples first")
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_train_with_few_labels_says_there_was_no_early_stopping(capsys, project):
    code, out, err = run(capsys, "--root", project, "train", "demo", "--set", "train.epochs=2",
                         "--out", project / "ck.pt")
    assert code == 0, err
    assert "nan" not in out.lower()
    assert "all 2 epochs (no early stopping: it needs at least 20 held-out human labels)" in out


def test_propagate_reports_the_solve_that_made_the_live_labels(capsys, tmp_path, series_set):
    Project.create(tmp_path, "ser", series_set, preprocess=False).close()
    code, out, err = run(capsys, "--root", tmp_path, "round", "ser", "--set", "train.epochs=1")
    assert code == 0, err
    said = [line for line in out.splitlines() if line.startswith("network: ")]
    assert len(said) == 1 and re.match(r"network: (joins|stays out|not trained \(too few)", said[0])
    code, out, err = run(capsys, "--root", tmp_path, "propagate", "ser")
    assert code == 0, err
    first = out.splitlines()[0]
    m = re.search(r"up to date with (\d+) human labels: the last solve took (\d+) "
                  r"conjugate-gradient iterations", first)
    assert m, first
    assert int(m.group(1)) == int((series_set.y >= 0).sum()) and int(m.group(2)) > 0


@pytest.mark.slow
def test_cli_and_annotator_export_the_same_bytes(capsys, tmp_path):
    """Both front ends go through the Annotator, so a project exports the same file from the CLI
    as from the library (and the app): live energies and reliability included, after new labels."""
    from speler.annotator import Annotator

    fast = ["--set", "views.network=never", "--set", "views.rocket_features=500"]
    code, _, err = run(capsys, "--root", tmp_path, "import", "--sample", "basicmotions",
                       "--project", "b", *fast)
    assert code == 0, err
    code, out, err = run(capsys, "--root", tmp_path, "round", "b")
    assert code == 0, err
    assert "\nnetwork: not trained (views.network is 'never')\n" in out  # says what the round did
    with Annotator.open(tmp_path, "b") as ann:  # a label after the round: live != saved
        pick = ann.suggest(n=1)[0]
        ann.label(pick.id, ann.data.classes[int(ann.data.y_true[pick.index])])
    for fmt in ("csv", "json"):
        cli_out = tmp_path / f"cli.{fmt}"
        # no --format: the name says which (a .json named file held CSV before)
        code, _, err = run(capsys, "--root", tmp_path, "export", "b", "--out", cli_out)
        assert code == 0, err
        with Annotator.open(tmp_path, "b") as ann:
            lib_out = ann.export(format=fmt, path=tmp_path / f"lib.{fmt}")
        a, b = cli_out.read_text(), lib_out.read_text()
        if fmt == "json":  # the header carries the time of writing
            import json

            a, b = json.loads(a), json.loads(b)
            for d in (a, b):
                d.get("header", d).pop("time", None)
        assert a == b


def test_suggest_before_any_round_lists_samples_to_label_first(capsys, tmp_path):
    code, _, err = run(capsys, "--root", tmp_path, "import", BASICMOTIONS, "--project", "bm",
                       "--no-file-labels")
    assert code == 0, err
    code, out, err = run(capsys, "--root", tmp_path, "suggest", "bm", "-n", "3")
    assert code == 0, err
    assert out.startswith("no round yet in bm: typical samples of the data's main groups")
    rows = [line for line in out.splitlines() if "similar samples" in line]
    assert len(rows) == 3 and all(re.match(r"\d+\s+BasicMotions_TRAIN#\d+\s", r) for r in rows)
