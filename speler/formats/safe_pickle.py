"""A restricted unpickler for annotation pickles: numpy arrays and builtin containers, nothing else.

``pickle.load`` runs whatever callable a pickle names, and even the plain opcodes can crash or
exhaust the process from a few bytes. ``safe_loads`` therefore works in three steps:

1. **Audit** (``_audit``): before anything is built, the opcode stream is walked with a model of
   the unpickler's stack and memo that records, per object, how deep it is nested and how many
   bytes it stands for. Refused: nesting deeper than ``MAX_DEPTH`` levels (hashing a tuple nested
   10^6 deep crashes the interpreter), memo indices beyond the number of opcodes read so far (the C
   unpickler sizes its memo table by the largest index: one ``LONG_BINPUT 2**28`` asks for 4 GB),
   a total of more than ``max_bytes`` of byte and string payload where an object reused by
   reference counts again at every use (one array shared by 200k annotations is 200k arrays to a
   reader), changing an object after it was put inside another (that is how cycles and
   after-the-fact deepening are built; ``pickle.dumps`` of acyclic data never does it), and
   ``BUILD`` on anything but an object the pickle just made by a call.
2. **Load** with the C unpickler, resolving only the globals numpy needs to rebuild arrays, dtypes
   and scalars (under both the numpy 1 ``numpy.core`` and the numpy 2 ``numpy._core`` names) plus a
   few harmless builtins; any other global (``os.system``, ``builtins.eval`` ...) raises
   DataFormatError naming it before anything is called. numpy never sees a pickled array or dtype
   state: ``numpy.dtype`` and ``_reconstruct`` hand out placeholders whose ``__setstate__``
   validates the state (numbers and fixed-size strings only, never object or structured dtypes,
   a shape whose bytes are exactly the raw data given), and only then asks numpy for the array.
3. **Finish**: the placeholders are replaced by the numpy arrays and dtypes they stand for.

Every refusal is a DataFormatError, ``"<where>: not a readable pickle: <what was found, and what
is allowed>"`` (``"<where>: refused to unpickle the global ..."`` for a global).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from speler.errors import DataFormatError

try:  # numpy >= 2
    from numpy._core import multiarray as _ma
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _ma  # type: ignore[no-redef]

#: Largest single array (bytes) a pickle may hold.
MAX_ARRAY_BYTES = 8 << 30
#: Default budget for all byte and string payload, counted once per reference (bytes).
MAX_TOTAL_BYTES = 8 << 30
#: Deepest nesting of containers a pickle may hold (PYSKL files need about 10).
MAX_DEPTH = 100

# dtype strings a pickle may name: booleans, integers, floats, complex, fixed-size bytes/str.
_DTYPE = re.compile(r"^[<>=|]?(b1|[iu][1248]|f[248]|c(8|16)|[SU][1-9]\d{0,8})$")


class _Refused(Exception):
    """Internal: the audit or a placeholder refused the pickle; the message says why."""


# -- 1. audit -------------------------------------------------------------------------------------
class _Node:
    """Model of one object on the unpickler's stack: nesting depth, payload bytes counted per
    reference, what made it, and whether it already sits inside another object."""

    __slots__ = ("depth", "cost", "kind", "inside")

    def __init__(self, depth: int, cost: int, kind: str) -> None:
        self.depth = depth
        self.cost = cost
        self.kind = kind  # "atom" | "container" | "global" | "call"
        self.inside = False


_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_REF_BYTES = 8  # one pointer per reference held by a container

# What the audit does per opcode: an action, how many items it pops below a MARK (or in all, when
# it takes no MARK), whether it pops to a MARK, and the kind of object it makes.
_SKIP, _STOP, _MARK, _POP, _POP_MARK, _DUP, _PUT, _MEMOIZE, _GET, _MUTATE, _MAKE = range(11)


def _plan(op: pickletools.OpcodeInfo) -> tuple[int, int, bool, str]:
    name, before = op.name, op.stack_before
    fixed = {"PROTO": _SKIP, "FRAME": _SKIP, "STOP": _STOP, "MARK": _MARK, "POP": _POP,
             "POP_MARK": _POP_MARK, "DUP": _DUP, "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT,
             "MEMOIZE": _MEMOIZE, "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET}
    if name in fixed:
        return fixed[name], 0, False, ""
    marked = pickletools.markobject in before
    n = before.index(pickletools.markobject) if marked else len(before)
    if name in _MUTATORS:
        return _MUTATE, n, marked, ""
    if name in ("GLOBAL", "STACK_GLOBAL"):
        kind = "global"
    elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"):
        kind = "call"
    elif name.startswith(("EMPTY_", "LIST", "TUPLE", "DICT", "FROZENSET")):
        kind = "container"
    else:
        kind = "atom"
    return _MAKE, n, marked, kind


_PLAN = {op: _plan(op) for op in pickletools.opcodes}


def _audit(data: bytes, *, max_depth: int, max_bytes: int) -> None:
    """Walk the opcodes of ``data`` without building anything; _Refused if the pickle is hostile."""
    stack: list[_Node] = []
    marks: list[int] = []
    memo: dict[int, _Node] = {}
    n_ops = 0
    fence = 0  # stack length at the innermost MARK: nothing below it may be popped

    def pop(n: int, pos: int) -> list[_Node]:
        if len(stack) - fence < n:
            raise _Refused(f"stack underflow at byte {pos}")
        out = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return out

    def pop_mark(pos: int) -> list[_Node]:
        nonlocal fence
        if not marks:
            raise _Refused(f"no MARK to pop at byte {pos}")
        k = marks.pop()
        fence = marks[-1] if marks else 0
        out = stack[k:]
        del stack[k:]
        return out

    def put_inside(holder: _Node, children: list[_Node], pos: int) -> None:
        depth, cost = holder.depth, holder.cost
        for child in children:
            if child is holder:
                raise _Refused(f"an object contains itself (byte {pos}); annotation pickles hold"
                               " no cycles")
            child.inside = True
            if child.depth >= depth:
                depth = child.depth + 1
            cost += child.cost + _REF_BYTES
        if depth > max_depth:
            raise _Refused(f"objects are nested deeper than {max_depth} levels (byte {pos});"
                           " annotation pickles need about 10")
        if cost > max_bytes:
            raise _Refused(
                f"the pickle stands for more than {max_bytes} bytes of data (byte {pos}), counting"
                " an array or string again each time it is reused by reference; split the file")
        holder.depth, holder.cost = depth, cost

    try:
        for op, arg, pos in pickletools.genops(data):
            n_ops += 1
            action, n_held, marked, kind = _PLAN[op]
            if action == _MAKE:
                if marked:
                    children = pop_mark(pos)
                    if n_held:
                        children = pop(n_held, pos) + children
                elif n_held:
                    children = pop(n_held, pos)
                else:  # an atom, an empty container or a global: nothing to look into
                    node = _Node(1 if kind == "container" else 0,
                                 len(arg) if isinstance(arg, (bytes, bytearray, str)) else 0, kind)
                    if node.cost > max_bytes:
                        put_inside(node, [], pos)
                    stack.append(node)
                    continue
                if not op.stack_after:  # BINPERSID & co. are refused when loading
                    continue
                node = _Node(0, 0, kind)
                put_inside(node, children, pos)
                stack.append(node)
            elif action == _GET:
                node = memo.get(int(arg))
                if node is None:
                    raise _Refused(f"memo index {arg} at byte {pos} was never stored")
                stack.append(node)
            elif action == _PUT or action == _MEMOIZE:
                idx = len(memo) if action == _MEMOIZE else int(arg)
                if not 0 <= idx <= n_ops:
                    raise _Refused(f"memo index {idx} at byte {pos} is out of range (only {n_ops}"
                                   " opcodes so far)")
                if len(stack) <= fence:
                    raise _Refused(f"stack underflow at byte {pos}")
                memo[idx] = stack[-1]
            elif action == _MUTATE:
                children = pop_mark(pos) if marked else []
                held = pop(n_held, pos)
                target, children = held[0], held[1:] + children
                name = op.name
                if target.kind not in ("container", "call"):
                    raise _Refused(f"{name} at byte {pos} changes a {target.kind}; only lists,"
                                   " dicts, sets and objects just made may be filled in")
                if name == "BUILD" and target.kind != "call":
                    raise _Refused(f"BUILD at byte {pos} sets the state of a {target.kind};"
                                   " only objects just made by a call may get a state")
                if target.inside:
                    raise _Refused(f"{name} at byte {pos} changes an object after it was put"
                                   " inside another; annotation pickles never do that")
                put_inside(target, children, pos)
                stack.append(target)
            elif action == _MARK:
                marks.append(len(stack))
                fence = len(stack)
            elif action == _STOP:
                return
            elif action == _POP:
                if len(stack) > fence:
                    stack.pop()
                elif marks:  # as the C unpickler does: POP on an empty frame drops the MARK
                    pop_mark(pos)
                else:
                    raise _Refused(f"stack underflow at byte {pos}")
            elif action == _POP_MARK:
                pop_mark(pos)
            elif action == _DUP:
                if len(stack) <= fence:
                    raise _Refused(f"stack underflow at byte {pos}")
                stack.append(stack[-1])
        raise _Refused("the pickle ends without a STOP opcode")
    except _Refused:
        raise
    except (ValueError, TypeError, OverflowError, IndexError) as exc:  # genops on a broken stream
        raise _Refused(f"broken opcode stream ({exc})") from None


# -- 2. load: placeholders that validate before numpy sees anything --------------------------------
def _size(shape: object, what: str) -> tuple[tuple[int, ...], int]:
    """(shape as ints, element count); _Refused unless a short tuple of ints >= 0."""
    if not isinstance(shape, (tuple, list)) or len(shape) > 32 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise _Refused(f"{what} has shape {str(shape)[:60]}, expected a tuple of up to 32 sizes")
    n = 1
    for s in shape:
        n *= s
    return tuple(shape), n


class _DtypeStub:
    """Stands for ``numpy.dtype(spec)`` until the pickle's dtype state (byte order) is known."""

    def __init__(self, spec: object, align: object = False, copy: object = False, *_: object) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or not _DTYPE.match(spec):
            raise _Refused(f"dtype {str(spec)[:40]!r} is not allowed; annotation pickles may hold"
                           " only numeric and fixed-size string arrays (no object or structured"
                           " dtypes)")
        self.spec = spec
        self.order = "="
        self.elsize = -1

    def __setstate__(self, state: object) -> None:
        # numpy writes (3 or 4, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4) or \
                state[1] not in ("<", ">", "|", "=") or state[2:5] != (None, None, None):
            raise _Refused(f"dtype state {str(state)[:80]} is not that of a plain numeric dtype")
        self.order = state[1]
        self.elsize = state[5] if isinstance(state[5], int) else -1

    def dtype(self) -> np.dtype:
        dt = np.dtype(self.spec)
        if self.order in "<>" and dt.byteorder not in ("|", self.order):
            dt = dt.newbyteorder(self.order)
        if self.elsize not in (-1, dt.itemsize):
            raise _Refused(f"dtype {self.spec} claims {self.elsize} bytes per item, it has"
                           f" {dt.itemsize}")
        return dt


def _dtype(*args: object) -> _DtypeStub:
    # a function, not the class: NEWOBJ could otherwise make a stub without running __init__
    return _DtypeStub(*args)


def _dtype_of(value: object, what: str) -> np.dtype:
    if isinstance(value, _DtypeStub):
        return value.dtype()
    if isinstance(value, bytes) and value == b"b":  # _reconstruct's placeholder dtype
        return np.dtype("b")
    raise _Refused(f"{what} has dtype {str(value)[:40]}, expected a numpy dtype")


class _ArrayStub:
    """Stands for an array until ``__setstate__`` (what ``BUILD`` calls) has validated its state."""

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise _Refused("an array gets its state twice")
        # numpy writes (version, shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise _Refused(f"array state {str(state)[:80]} is not (1, shape, dtype, fortran, data)")
        _, shape, dt, fortran, raw = state
        shape, n = _size(shape, "array")
        dt = _dtype_of(dt, "array")
        if not isinstance(fortran, bool):
            raise _Refused(f"array state has is_fortran {str(fortran)[:20]}, expected a bool")
        if isinstance(raw, str):  # Python 2 pickles, read as latin-1
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"array data is a {type(raw).__name__}, expected bytes")
        need = n * dt.itemsize
        if max(n, need) > MAX_ARRAY_BYTES:
            raise _Refused(f"array of shape {shape} {dt} is larger than {MAX_ARRAY_BYTES} bytes")
        if len(raw) != need:
            raise _Refused(f"array of shape {shape} {dt} needs {need} bytes of data, the pickle"
                           f" gives {len(raw)}")
        arr = _ma._reconstruct(np.ndarray, (0,), b"b")
        arr.__setstate__((1, shape, dt, fortran, bytes(raw)))  # now a state numpy reads safely
        self.array = arr


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: ``_reconstruct`` needs the class as an argument,
    but calling ``numpy.ndarray(shape, dtype, buffer, strides=...)`` directly could build huge
    arrays or zero-stride views from a few bytes, so the real class is never handed out."""

    def __reduce__(self):  # pragma: no cover - never pickled
        raise TypeError("not picklable")


_NDARRAY = _NdarrayName()


def _reconstruct(subtype, shape, dtype):
    # numpy always writes _reconstruct(ndarray, (0,), b"b") and then BUILDs the real state.
    if subtype is not _NDARRAY:
        raise _Refused("only plain numpy.ndarray may be rebuilt")
    shape, n = _size(shape, "array")
    if n > MAX_ARRAY_BYTES:
        raise _Refused(f"array of shape {shape} is larger than {MAX_ARRAY_BYTES} bytes")
    if n != 0:
        raise _Refused(f"_reconstruct with shape {shape}; numpy writes (0,) and sets the data after")
    _dtype_of(dtype, "array")
    return _ArrayStub()


def _frombuffer(buf, dtype, shape, order):
    # protocol 5: numpy writes _frombuffer(bytearray(data), dtype, shape, order)
    shape, n = _size(shape, "array")
    dt = _dtype_of(dtype, "array")
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise _Refused("_frombuffer is allowed only from in-band bytes in C or F order")
    if n * dt.itemsize != len(buf) or n > MAX_ARRAY_BYTES:
        raise _Refused(f"array of shape {shape} {dt} needs {n * dt.itemsize} bytes of data, the"
                       f" pickle gives {len(buf)}")
    arr = np.frombuffer(buf, dtype=dt, count=n).reshape(shape, order=order)
    return _ArrayStub(arr if arr.flags.writeable else arr.copy(order="K"))


def _scalar(dtype, data=None):
    dt = _dtype_of(dtype, "scalar")
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _Refused(f"scalar of dtype {dt} needs {dt.itemsize} bytes, got"
                       f" {str(data)[:40]}")
    return _ma.scalar(dt, data)


def _bytearray(*args):
    # protocol 5 stores bytearrays as bytearray(b"..."); bytearray(10**11) would fill 100 GB
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
        raise _Refused("bytearray is allowed only from bytes")
    return bytearray(*args)


def _bytes(*args):
    # protocol < 3 stores b"" as bytes(); bytes(10**11) would fill 100 GB
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
        raise _Refused("bytes is allowed only empty or from bytes")
    return bytes(*args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "") not in ("latin1", "utf8"):
        raise _Refused("_codecs.encode is allowed only for latin1/utf-8 text")
    return obj.encode(encoding, "strict")


def _set(*args):
    return set(*args)


def _frozenset(*args):
    return frozenset(*args)


def _ordered_dict(*args):
    # Python 3 writes OrderedDict() and SETITEMS; older ones OrderedDict([[key, value], ...])
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise _Refused("OrderedDict is allowed only empty or from a list of pairs")
    return OrderedDict(*args)


ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): _ordered_dict,
}
for _mod in ("numpy.core", "numpy._core"):
    ALLOWED[(f"{_mod}.multiarray", "_reconstruct")] = _reconstruct
    ALLOWED[(f"{_mod}.multiarray", "scalar")] = _scalar
    ALLOWED[(f"{_mod}.numeric", "_frombuffer")] = _frombuffer
for _mod in ("builtins", "__builtin__"):  # protocol < 3 pickles name the Python 2 module
    for _obj in (complex, slice):
        ALLOWED[(_mod, _obj.__name__)] = _obj
    ALLOWED[(_mod, "set")] = _set
    ALLOWED[(_mod, "frozenset")] = _frozenset
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


# -- 3. finish: placeholders become numpy objects ---------------------------------------------------
def _finish(obj: object, done: dict[int, object]) -> object:
    """``obj`` with every placeholder replaced (lists and dicts in place). The audit bounded the
    nesting, so the recursion is shallow; ``done`` makes shared objects cost one visit."""
    key = id(obj)
    if key in done:
        return done[key]
    out = obj
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise _Refused("an array was never given its data")
        out = obj.array
    elif isinstance(obj, _DtypeStub):
        out = obj.dtype()
    elif isinstance(obj, list):
        done[key] = obj
        obj[:] = [_finish(v, done) for v in obj]
    elif isinstance(obj, dict):
        done[key] = obj
        for k, v in obj.items():
            if _finish(k, done) is not k:
                raise _Refused("a dict key holds an array or dtype")
            obj[k] = _finish(v, done)
    elif isinstance(obj, tuple):
        items = [_finish(v, done) for v in obj]
        if any(a is not b for a, b in zip(items, obj)):
            out = tuple(items)
    elif isinstance(obj, (set, frozenset)):
        if any(_finish(v, done) is not v for v in obj):
            raise _Refused("a set holds an array or dtype")
    done[key] = out
    return out


def safe_loads(data: bytes, *, where: str = "<pickle>", max_bytes: int = MAX_TOTAL_BYTES,
               max_depth: int = MAX_DEPTH) -> object:
    """Unpickle ``data`` allowing only numpy arrays and builtins; DataFormatError otherwise.

    max_bytes: budget for all byte and string payload, an object counting again at each reference
        to it (so a reader that copies each use stays within it); max_depth: deepest nesting.
    """
    try:
        _audit(data, max_depth=max_depth, max_bytes=max_bytes)
        obj = _Unpickler(io.BytesIO(data), where).load()
        return _finish(obj, {})
    except DataFormatError:
        raise
    except _Refused as exc:
        raise DataFormatError(f"{where}: not a readable pickle: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError, UnicodeError,
            ImportError) as exc:
        raise DataFormatError(f"{where}: not a readable pickle ({type(exc).__name__}:"
                              f" {str(exc)[:200]})") from None


def safe_load(path: str | Path, *, max_bytes: int = MAX_TOTAL_BYTES,
              max_depth: int = MAX_DEPTH) -> object:
    """``safe_loads`` of a file's bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot be read ({exc})") from None
    return safe_loads(data, where=str(path), max_bytes=max_bytes, max_depth=max_depth)
