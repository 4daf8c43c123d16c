import numpy as np
import pytest

from speler.config import PreprocessConfig
from speler.data.layouts import NTU25, SERIES
from speler.data.schema import SequenceSet
from speler.data.transforms import frames_for, preprocess, resample
from speler.errors import DataFormatError


def _skeleton(n=4, t=30, m=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, t, 25, m)).astype(np.float32) * 0.1
    if m > 1:
        x[..., 1] *= 0.0  # a second person that is absent
    return SequenceSet(
        x=x + np.array([1.0, 2.0, 3.0], dtype=np.float32)[None, :, None, None, None] * (x != 0),
        ids=np.array([f"s{i}" for i in range(n)]), classes=("a",), y=np.zeros(n, dtype=np.int64),
        layout=NTU25, lengths=np.array([t, t // 2, t, 5])[:n],
    )


def test_resample_keeps_end_points_and_linear_motion():
    t = np.arange(10, dtype=np.float32)
    x = np.zeros((1, 1, 12, 1, 1), dtype=np.float32)
    x[0, 0, :10, 0, 0] = t * 2
    out = resample(x, np.array([10]), 19)
    np.testing.assert_allclose(out[0, 0, :, 0, 0], np.linspace(0, 18, 19), atol=1e-5)


def test_preprocess_shape_centre_and_padding_ignored():
    ds = _skeleton()
    out = preprocess(ds, PreprocessConfig(frames=16, persons=1, align_view=False, scale=False))
    assert out.x.shape == (4, 3, 16, 25, 1)
    assert out.fps == 0.0  # unknown stays unknown
    timed = preprocess(ds.replace(fps=30.0), PreprocessConfig(frames=16, persons=1, align_view=False,
                                                              scale=False))
    assert timed.fps == pytest.approx(30.0 * 16 / np.median(ds.lengths))
    np.testing.assert_array_equal(out.lengths, 16)
    # centre joint of the first frame is the origin
    np.testing.assert_allclose(out.x[:, :, 0, NTU25.center[0], 0], 0, atol=1e-6)
    # sample 3 had 5 valid frames: its last resampled frame equals its 5th raw frame, centred
    raw = ds.x[3, :, 4, :, 0] - ds.x[3, :, 0, NTU25.center[0], 0][:, None]
    np.testing.assert_allclose(out.x[3, :, -1, :, 0], raw, atol=1e-5)


def test_untracked_joints_stay_at_zero_when_centred():
    ds = _skeleton(n=2, m=1)
    x = ds.x.copy()
    x[:, :, :, 7] = 0.0  # joint 7 never tracked (a sensor writes zeros)
    x[0, :, 3:6, 11] = 0.0  # joint 11 lost for three frames
    out = preprocess(ds.replace(x=x, lengths=np.full(2, 30)),
                     PreprocessConfig(frames=30, persons=1, align_view=False, scale=False)).x
    assert np.all(out[:, :, :, 7] == 0) and np.all(out[0, :, 3:6, 11] == 0)
    assert np.all(out[0, :, 6:, 11] != 0)  # tracked again: centred as the rest


def test_most_active_person_comes_first_and_absent_stays_zero():
    ds = _skeleton(m=2)
    x = ds.x.copy()
    x[..., 1], x[..., 0] = ds.x[..., 0], 0.0  # the actor is in slot 1
    out = preprocess(ds.replace(x=x), PreprocessConfig(frames=8, persons=2, align_view=False))
    assert np.abs(out.x[..., 0]).sum() > 0
    assert np.abs(out.x[..., 1]).sum() == 0


def test_view_alignment_makes_spine_up_and_shoulders_along_x():
    rng = np.random.default_rng(1)
    x = np.zeros((1, 3, 4, 25, 1), dtype=np.float32)
    base = rng.normal(size=(3, 25)).astype(np.float32)
    x[0, :, :, :, 0] = base[:, None, :]
    ds = SequenceSet(x=x, ids=np.array(["a"]), classes=("a",), y=np.array([0]), layout=NTU25)
    out = preprocess(ds, PreprocessConfig(frames=4, persons=1, scale=False))
    f = out.x[0, :, 0, :, 0]
    lo, hi = NTU25.spine
    spine = f[:, hi] - f[:, lo]
    assert spine[0] == pytest.approx(0, abs=1e-5) and spine[2] == pytest.approx(0, abs=1e-5)
    assert spine[1] > 0
    left, right = NTU25.shoulders
    assert (f[:, left] - f[:, right])[2] == pytest.approx(0, abs=1e-5)
    assert (f[:, left] - f[:, right])[0] > 0
    # a rotation keeps distances between joints
    d_in = np.linalg.norm(base[:, :, None] - base[:, None, :], axis=0)
    d_out = np.linalg.norm(f[:, :, None] - f[:, None, :], axis=0)
    np.testing.assert_allclose(d_in, d_out, atol=1e-4)


def test_dropped_frames_repeat_the_last_valid_one():
    ds = _skeleton(n=1, m=1)
    x = ds.x.copy()
    x[0, :, 10] = 0.0
    out = preprocess(ds.replace(x=x), PreprocessConfig(frames=30, persons=1, align_view=False, center=False,
                                                               scale=False))
    np.testing.assert_allclose(out.x[0, :, 10], ds.x[0, :, 9], atol=1e-6)


def test_each_skeleton_is_divided_by_its_own_rms_and_scores_are_kept():
    rng = np.random.default_rng(3)
    n, t, v = 3, 12, 25
    x = np.zeros((n, 4, t, v, 2), dtype=np.float32)
    x[:, :3, :, :, 0] = rng.normal(size=(n, 3, t, v))
    x[:, :3, :, :, 1] = rng.normal(size=(n, 3, t, v)) * 0.5 + 2.0  # a second person beside
    x[:, 3] = rng.uniform(0.2, 1.0, size=(n, t, v, 2))  # confidence: not a coordinate
    x[1] *= 0.0  # a sample nobody is in
    x[2, :3] = x[0, :3] * 3.0  # sample 0's person, three times as large
    x[2, 3] = x[0, 3]
    ds = SequenceSet(x=x, ids=np.array(["a", "b", "c"]), classes=("u",), y=np.zeros(n, np.int64),
                     layout=NTU25, channels=("x", "y", "z", "score"))
    cfg = PreprocessConfig(frames=t, persons=2, align_view=False)
    out = preprocess(ds, cfg).x
    unscaled = preprocess(ds, PreprocessConfig(frames=t, persons=2, align_view=False, scale=False)).x
    rms = np.sqrt((out[:, :3, ..., 0] ** 2).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(rms[[0, 2]], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[2], out[0], atol=1e-5)  # size no longer tells them apart
    assert np.abs(out[1]).sum() == 0  # nothing to scale: zeros stay zeros, no NaN
    np.testing.assert_array_equal(out[:, 3], unscaled[:, 3])  # scores as they were
    # both persons by person 0's factor: their relative placement is kept
    factor = np.sqrt((unscaled[0, :3, ..., 0] ** 2).mean())
    np.testing.assert_allclose(out[0, :3] * factor, unscaled[0, :3], atol=1e-5)


def test_the_scale_of_2d_keypoints_ignores_missed_joints_and_where_the_person_stands():
    from speler.data.layouts import get_layout

    layout = get_layout("openpose18")
    rng = np.random.default_rng(4)
    pose = np.zeros((3, 10, layout.num_joints, 1), dtype=np.float32)
    pose[:2] = rng.normal(size=(2, 10, layout.num_joints, 1)) * 40.0  # pixels around the body
    pose[2] = 0.9
    pose[:, :, 3:5] = 0.0  # two joints the detector missed: (0, 0) with score 0
    samples = []
    for where in ((200.0, 300.0), (1500.0, 900.0)):  # near a corner, far across the image
        p = pose.copy()
        p[0, :, :, 0] += np.where(p[2, :, :, 0] > 0, where[0], 0.0)
        p[1, :, :, 0] += np.where(p[2, :, :, 0] > 0, where[1], 0.0)
        samples.append(p)
    ds = SequenceSet(x=np.stack(samples), ids=np.array(["near", "far"]), classes=("u",),
                     y=np.zeros(2, np.int64), layout=layout, channels=("x", "y", "score"))
    for center in (True, False):
        out = preprocess(ds, PreprocessConfig(frames=10, persons=1, center=center)).x
        seen = out[:, 2] > 0
        # the same body, the same size wherever it stands: the seen joints' spread matches
        spread = [np.ptp(out[i, :2][:, seen[i]], axis=1) for i in range(2)]
        np.testing.assert_allclose(spread[0], spread[1], rtol=1e-4)
        assert 0.5 < float(np.max(spread[0])) < 20.0  # in units of the body's own spread


def test_series_zscore_and_bad_config():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(3, 2, 20, 1, 1)) * 5 + 7).astype(np.float32)
    ds = SequenceSet(x=x, ids=np.array(["a", "b", "c"]), classes=("u",), y=np.zeros(3, np.int64),
                     layout=SERIES)
    out = preprocess(ds, PreprocessConfig(frames=20, normalize_series="clip"))
    np.testing.assert_allclose(out.x.mean(axis=2), 0, atol=1e-5)
    np.testing.assert_allclose(out.x.std(axis=2), 1, atol=1e-4)
    with pytest.raises(DataFormatError, match="frames"):
        preprocess(ds, PreprocessConfig(frames=1))
    with pytest.raises(DataFormatError, match="normalize_series must be one of dataset, clip, none"):
        preprocess(ds, PreprocessConfig(normalize_series="per-clip"))
    raw = preprocess(ds, PreprocessConfig(frames=20, normalize_series="none")).x
    np.testing.assert_array_equal(raw, x)


def test_series_channels_are_standardised_over_the_dataset_and_keep_each_clips_amplitude():
    rng = np.random.default_rng(5)
    t = 50
    shape = np.sin(np.linspace(0, 6 * np.pi, t))
    x = np.zeros((4, 2, t, 1, 1), dtype=np.float32)
    for i, amp in enumerate((0.1, 0.1, 2.0, 2.0)):  # two still clips, two lively ones
        x[i, 0, :, 0, 0] = amp * shape + 9.81  # an accelerometer (in m/s²)
        x[i, 1, :, 0, 0] = 300.0 * amp * shape + rng.normal(0, 1, t)  # a gyroscope (in °/s)
    ds = SequenceSet(x=x, ids=np.array(list("abcd")), classes=("u",), y=np.zeros(4, np.int64),
                     layout=SERIES)
    out = preprocess(ds, PreprocessConfig(frames=t)).x  # the default: "dataset"
    # every channel on one scale over the whole set
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3, 4)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3, 4)), 1, atol=1e-4)
    # the lively clips still move 20x as much as the still ones (a clip's z-score made them equal)
    spread = out[:, 0].std(axis=(1, 2, 3))
    np.testing.assert_allclose(spread[2] / spread[0], 20.0, rtol=1e-3)
    clip = preprocess(ds, PreprocessConfig(frames=t, normalize_series="clip")).x
    np.testing.assert_allclose(clip[:, 0].std(axis=(1, 2, 3)), 1, atol=1e-4)


def test_frames_are_bounded():
    ds = _skeleton()
    for frames in (10_001, 2_000_000, 100_000_000):
        with pytest.raises(DataFormatError,
                           match=rf"frames must be 0 \(by the data\) or between 2 and 10000, got {frames}"):
            preprocess(ds, PreprocessConfig(frames=frames))
    assert preprocess(_skeleton(n=1), PreprocessConfig(frames=10_000)).x.shape[2] == 10_000


def test_frames_by_the_data_keep_a_series_rate_and_bring_skeletons_to_one_count():
    def series(lengths):
        t = max(lengths)
        x = np.zeros((len(lengths), 2, t, 1, 1), dtype=np.float32)
        for i, n in enumerate(lengths):
            x[i, :, :n] = np.sin(np.arange(n) * 0.9)[None, :, None, None]  # 0.14 cycles a sample
        return SequenceSet(x=x, ids=np.array([f"s{i}" for i in range(len(lengths))]), classes=("u",),
                           y=np.zeros(len(lengths), np.int64), layout=SERIES,
                           lengths=np.array(lengths))

    auto = PreprocessConfig()  # frames 0
    assert frames_for(series([200, 206, 210]), auto) == 206  # the median length, as recorded
    assert frames_for(series([20, 30, 30]), auto) == 48  # short windows: at least 48
    assert frames_for(series([1000, 1200]), auto) == 256  # long ones: at most 256
    assert frames_for(_skeleton(), auto) == 48  # clips of an action: one frame count
    assert frames_for(series([200, 206, 210]), PreprocessConfig(frames=64)) == 64  # as asked
    out = preprocess(series([206, 206]), auto)
    assert out.x.shape[2] == 206 and list(out.lengths) == [206, 206]
    # the oscillation survives at its own rate; at 48 frames it would alias to another one
    spectrum = np.abs(np.fft.rfft(out.x[0, 0, :, 0, 0]))
    assert np.argmax(spectrum) == round(206 * 0.9 / (2 * np.pi))


_TIGHT_MEMORY = """
import resource
import numpy as np
from speler.config import PreprocessConfig
from speler.data.layouts import NTU25
from speler.data.schema import SequenceSet
from speler.data.transforms import preprocess
from speler.errors import DataFormatError

ds = SequenceSet(x=np.ones((40, 3, 16, 25, 2), np.float32), ids=np.array([f"s{i}" for i in range(40)]),
                 classes=("a",), y=np.zeros(40, np.int64), layout=NTU25, where="tight.npz")
with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
cap = vm + (300 << 20)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    preprocess(ds, PreprocessConfig(frames=10_000))  # 40 x 3 x 10000 x 25 x 2 float32 = 229 MiB
except DataFormatError as exc:
    print("REFUSED", exc)
else:
    print("DONE")
"""


def test_preprocess_refuses_what_does_not_fit_in_memory_before_allocating():
    """With 300 MiB of address space left, resampling to 10,000 frames (229 MiB out, ~3x that on
    the way) is refused with a message instead of a MemoryError halfway through."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(repo))
    res = subprocess.run([sys.executable, "-c", _TIGHT_MEMORY], capture_output=True, text=True,
                         timeout=120, cwd=repo, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("REFUSED tight.npz: resampling 40 samples to 10000 frames"), res.stdout
    assert "GiB of memory is free; use fewer frames" in res.stdout
