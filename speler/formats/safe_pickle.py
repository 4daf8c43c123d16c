"""A restricted unpickler for annotation pickles: numpy arrays and builtin containers, nothing else.

``pickle.load`` runs whatever callable a pickle names. ``safe_load`` resolves only the globals
numpy needs to rebuild arrays, dtypes and scalars (under both the numpy 1 ``numpy.core`` and the
numpy 2 ``numpy._core`` module names) plus a few harmless builtins; any other global
(``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) raises DataFormatError naming it before
anything is called. Arrays are checked against a size limit before they are allocated, and the
callables that could allocate from a small input (``numpy.ndarray(shape, ...)``, ``bytes(n)``,
``bytearray(n)``) are never handed out as such, so a pickle cannot ask for terabytes.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np

from speler.errors import DataFormatError

try:  # numpy >= 2
    from numpy._core import multiarray as _ma
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _ma  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

MAX_ARRAY_BYTES = 8 << 30


def _checked_size(shape, dtype) -> None:
    try:
        n = 1
        for s in (shape if isinstance(shape, (tuple, list)) else (shape,)):
            s = int(s)
            if s < 0:
                raise ValueError
            n *= s
        itemsize = np.dtype(dtype).itemsize if not isinstance(dtype, bytes) else 1
    except (TypeError, ValueError, OverflowError):
        raise pickle.UnpicklingError(f"invalid array shape {str(shape)[:60]}") from None
    if n * max(itemsize, 1) > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"array of shape {str(shape)[:60]} is larger than"
                                     f" {MAX_ARRAY_BYTES} bytes")


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: ``_reconstruct`` needs the class as an argument,
    but calling ``numpy.ndarray(shape, dtype, buffer, strides=...)`` directly could build huge
    arrays or zero-stride views from a few bytes, so the real class is never handed out."""

    def __reduce__(self):  # pragma: no cover - never pickled
        raise TypeError("not picklable")


_NDARRAY = _NdarrayName()


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("only plain numpy.ndarray may be rebuilt")
    _checked_size(shape, dtype)
    return _ma._reconstruct(np.ndarray, shape, dtype)


def _bytearray(*args):
    # protocol 5 stores bytearrays as bytearray(b"..."); bytearray(10**11) would fill 100 GB
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
        raise pickle.UnpicklingError("bytearray is allowed only from bytes")
    return bytearray(*args)


def _bytes(*args):
    # protocol < 3 stores b"" as bytes(); bytes(10**11) would fill 100 GB
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
        raise pickle.UnpicklingError("bytes is allowed only empty or from bytes")
    return bytes(*args)


def _frombuffer(buf, dtype, shape, order):
    _checked_size(shape, dtype)
    return _numeric._frombuffer(buf, dtype, shape, order)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "") not in ("latin1", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1/utf-8 text")
    return obj.encode(encoding, errors)


ALLOWED: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _ma.scalar,
    ("numpy._core.multiarray", "scalar"): _ma.scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): OrderedDict,
}
for _mod in ("builtins", "__builtin__"):  # protocol < 3 pickles name the Python 2 module
    for _obj in (set, frozenset, complex, slice):
        ALLOWED[(_mod, _obj.__name__)] = _obj
    ALLOWED[(_mod, "bytearray")] = _bytearray
    ALLOWED[(_mod, "bytes")] = _bytes

class _Unpickler(pickle.Unpickler):
    def __init__(self, file, where: str) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        obj = ALLOWED.get((module, name))
        if obj is None:
            raise DataFormatError(
                f"{self._where}: refused to unpickle the global {module}.{name}; annotation pickles"
                " may hold only numpy arrays and builtin containers, and nothing in this file was run"
            )
        return obj

    def persistent_load(self, pid):
        raise DataFormatError(f"{self._where}: refused a persistent id in the pickle")


def safe_loads(data: bytes, *, where: str = "<pickle>") -> object:
    """Unpickle ``data`` allowing only numpy arrays and builtins; DataFormatError otherwise."""
    try:
        return _Unpickler(io.BytesIO(data), where).load()
    except DataFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError, UnicodeError,
            ImportError) as exc:
        raise DataFormatError(f"{where}: not a readable pickle ({type(exc).__name__}:"
                              f" {str(exc)[:200]})") from None


def safe_load(path: str | Path) -> object:
    """``safe_loads`` of a file's bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot be read ({exc})") from None
    return safe_loads(data, where=str(path))
