"""Which folders on the server the app may import data from by path.

The app's "Server path" import reads whatever path a browser user types, so it is limited to the
data folders named in ``$SPELER_DATA_DIRS`` (separated by ``os.pathsep``, ``:`` on Linux). Unset,
they are the bundled samples' folder (``speler.data.samples.SAMPLE_DIR``: the repository's
``sample_data/``, or the installed package's) and ``../shared/data`` beside the repository when it
exists; set but empty, no server path is allowed (uploads still are). Paths are compared after
resolving symbolic links and ``..``, so neither leads out of an allowed folder. The command line
reads any path its user can: it runs with that user's rights already.
"""

from __future__ import annotations

import os
from pathlib import Path

from speler.data.samples import SAMPLE_DIR
from speler.errors import AccessError

ENV = "SPELER_DATA_DIRS"
_REPO = Path(__file__).resolve().parents[1]


def data_dirs() -> list[Path]:
    """The allowed folders, resolved; folders that do not exist are left out."""
    env = os.environ.get(ENV)
    if env is not None:
        raw = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    else:
        raw = [SAMPLE_DIR, _REPO.parent / "shared" / "data"]
    return [p.resolve() for p in raw if p.is_dir()]


def check_data_path(path: str | Path) -> Path:
    """``path`` resolved, if it lies in one of ``data_dirs()``; AccessError otherwise, before
    anything about the path (even whether it exists) is looked at. A relative path is read from
    the data folders (as listed beside the field): the first in which it exists, else the first
    it stays inside of (so the reader then says it is missing there)."""
    text = str(path).strip()
    if not text or "\x00" in text:
        raise AccessError(f"{text!r}: not a path")
    allowed = data_dirs()
    try:
        given = Path(text).expanduser()
        bases = [None] if given.is_absolute() else allowed
        candidates = [(given if d is None else d / given).resolve() for d in bases]
    except (RuntimeError, OSError, ValueError) as exc:  # ~nosuchuser, a symlink loop
        raise AccessError(f"{text}: not a usable path ({exc})") from None
    inside = [c for c in candidates
              if any(c == d or c.is_relative_to(d) for d in allowed)]
    if inside:
        return next((c for c in inside if c.exists()), inside[0])
    where = ", ".join(str(d) for d in allowed) if allowed else "none are configured"
    raise AccessError(
        f"{text}: the app imports only from its data folders ({where}); copy the data into one, or"
        f" set {ENV} (folders separated by '{os.pathsep}') where the app is started")
