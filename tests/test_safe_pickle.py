"""The restricted unpickler against hostile pickles that crash or exhaust the process.

Each hostile pickle runs in a child process whose address space is capped (RLIMIT_AS at what it
uses after the imports plus 1 GiB): a regression then shows as a crash (negative return code) or a
MemoryError in the child, failing the test, instead of taking the machine down.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from speler.errors import DataFormatError
from speler.formats import safe_pickle
from speler.formats.safe_pickle import safe_loads

REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import resource, sys
    from speler.errors import DataFormatError
    from speler.formats import read
    from speler.formats.safe_pickle import safe_load

    def vm_bytes():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        return 1 << 30

    cap = vm_bytes() + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        if sys.argv[2] == "pyskl":
            read(sys.argv[1], format="pyskl")
        else:
            safe_load(sys.argv[1])
    except DataFormatError as exc:
        print("REFUSED", exc)
    else:
        print("LOADED")
""")


def _run_child(tmp_path: Path, data: bytes, *, via: str = "safe_load") -> str:
    """What the child said (``REFUSED <message>`` or ``LOADED``); fails on a crash."""
    f = tmp_path / "hostile.pkl"
    f.write_bytes(data)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(f), via], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, (
        f"the child died (return code {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout.strip()


class _ObjectArray:
    """numpy's own array reduce, with an object dtype and a list shorter than the shape."""

    def __init__(self, n: int, items: list) -> None:
        self.n, self.items = n, items

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"),
                (1, (self.n,), np.dtype(object), False, self.items))


@pytest.mark.parametrize("n, items", [(10**6, [1, 2]), (10**9, [])],
                         ids=["short-list-read-past", "1e9-object-state"])
def test_object_dtype_arrays_are_refused_before_numpy(tmp_path: Path, n: int, items: list) -> None:
    out = _run_child(tmp_path, pickle.dumps({"annotations": [_ObjectArray(n, items)]}, protocol=4))
    assert out.startswith("REFUSED") and "hostile.pkl: not a readable pickle: dtype 'O8' is not" \
        " allowed" in out, out


def test_deeply_nested_dict_key_is_refused(tmp_path: Path) -> None:
    # {((((...),),),): None} nested 10^6 deep: hashing the key recursed until the C stack overflowed
    data = b"\x80\x02}" + b")" + b"\x85" * 10**6 + b"Ns."
    out = _run_child(tmp_path, data)
    assert out.startswith("REFUSED") and "nested deeper than 100 levels" in out, out
    # 100 levels still load; the limit can be set per call
    assert safe_loads(b"\x80\x02)" + b"\x85" * 99 + b".") is not None
    with pytest.raises(DataFormatError, match="deeper than 10 levels"):
        safe_loads(b"\x80\x02)" + b"\x85" * 10 + b".", max_depth=10)


def test_memo_index_far_beyond_the_file_is_refused(tmp_path: Path) -> None:
    # 9 bytes: None, LONG_BINPUT 2**28 -- the C unpickler sized its memo table to 2**28 entries
    data = b"\x80\x02N" + b"r" + struct.pack("<I", 2**28) + b"."
    assert len(data) == 9
    out = _run_child(tmp_path, data)
    assert out.startswith("REFUSED") and "memo index 268435456 at byte 3 is out of range" in out, out
    with pytest.raises(DataFormatError, match="memo index 7 at byte 2 was never stored"):
        safe_loads(b"\x80\x02h\x07.")


def test_one_array_shared_by_many_annotations_counts_at_each_use(tmp_path: Path) -> None:
    # 490 KB on disk; a reader copying each annotation's keypoints needs 200k copies (>17 GB)
    anno = {"frame_dir": "a", "label": 0, "keypoint": np.zeros((1, 1300, 17, 2), np.float16)}
    data = pickle.dumps({"annotations": [anno] * 200_000}, protocol=4)
    assert len(data) < 500_000
    out = _run_child(tmp_path, data, via="pyskl")
    assert out.startswith("REFUSED") and "again each time it is reused by reference" in out, out
    # the budget is per call: a small one refuses a small honest file, counting each reference
    arr = np.zeros(1000, np.uint8)
    assert safe_loads(pickle.dumps([arr] * 3), max_bytes=4000)[2].shape == (1000,)
    with pytest.raises(DataFormatError, match="more than 4000 bytes of data"):
        safe_loads(pickle.dumps([arr] * 5), max_bytes=4000)


def _ops(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def test_objects_changed_after_being_shared_are_refused() -> None:
    # 300 empty lists, then list k gets list k-1 appended in reverse order: each looks 2 deep when
    # it is appended, the result is 300 deep. Also the plain cycle a = [a].
    lists = b"".join(b"]r" + struct.pack("<I", k) + b"0" for k in range(300))
    chain = b"".join(b"j" + struct.pack("<I", k) + b"j" + struct.pack("<I", k - 1) + b"a0"
                     for k in range(299, 0, -1))
    with pytest.raises(DataFormatError, match="changes an object after it was put inside another"):
        safe_loads(_ops(lists, chain, b"j" + struct.pack("<I", 299)))
    with pytest.raises(DataFormatError, match="an object contains itself"):
        safe_loads(_ops(b"]q\x00h\x00a"))


def test_build_on_a_global_is_refused() -> None:
    # BUILD (None, {"__defaults__": ("rot13",)}) on the allowed function _codecs.encode would set
    # its attributes for the rest of the process
    before = safe_pickle._codecs_encode.__defaults__
    data = _ops(b"c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__X\x05\x00\x00\x00rot13\x85s\x86b")
    with pytest.raises(DataFormatError, match="BUILD at byte 50 changes a global"):
        safe_loads(data)
    assert safe_pickle._codecs_encode.__defaults__ == before


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_honest_pickles_load_as_pickle_does(protocol: int) -> None:
    rng = np.random.default_rng(3)
    shared = rng.normal(size=(2, 3)).astype(np.float32)
    obj = {
        "f16": rng.uniform(size=(2, 5, 17, 2)).astype(np.float16),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "fortran": np.asfortranarray(rng.normal(size=(3, 4))),
        "flags": np.array([True, False]), "names": np.array(["walk", "sit"]),
        "scalar0d": np.array(2.5), "c": np.array([1 + 2j]), "empty": np.zeros((0, 3)),
        "np_scalars": [np.float64(1.5), np.int64(-3), np.float16(0.25)],
        "shared": [shared, shared], "od": OrderedDict(b=1, a=2), "set": {1, 2}, "fs": frozenset("ab"),
        "misc": (b"raw", bytearray(b"ba"), 3 + 4j, slice(1, 9, 2), None, True, 2**70, "café"),
        "dtype": np.dtype("<f8"),
    }
    data = pickle.dumps(obj, protocol=protocol)
    back, ref = safe_loads(data), pickle.loads(data)
    assert set(back) == set(obj)
    for key in ("f16", "big_endian", "fortran", "flags", "names", "scalar0d", "c", "empty"):
        assert type(back[key]) is np.ndarray and back[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(back[key], obj[key])
    assert back["fortran"].flags.f_contiguous
    assert back["np_scalars"] == obj["np_scalars"]
    assert [type(v) for v in back["np_scalars"]] == [np.float64, np.int64, np.float16]
    assert back["shared"][0] is back["shared"][1]
    np.testing.assert_array_equal(back["shared"][0], shared)
    assert back["od"] == obj["od"] and list(back["od"]) == ["b", "a"]
    assert back["set"] == {1, 2} and back["fs"] == frozenset("ab") and back["misc"] == obj["misc"]
    assert back["dtype"] == np.dtype("<f8")
    back["f16"][0, 0, 0, 0] = 1  # writable like pickle's own arrays
