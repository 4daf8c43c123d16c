"""Writing a file so that readers see the old contents or the new ones, never half of either.

The files a project keeps (data, checkpoints, config, simulation results) and PYSKL pickles are
written through ``write_atomically`` (label exports have their own writer in ``speler.export``,
which also names the target in its errors): into a hidden temporary file beside the target,
renamed over it once complete, and removed when the write fails or is interrupted. The file gets
the permissions any newly created file gets (0666 less the umask), where ``tempfile.mkstemp``
would leave it readable by its owner alone, so people who share a project folder could not
read its checkpoints.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a new binary file and put it at ``path`` (its folder must exist);
    returns ``path``. Whatever ``write`` raises propagates, and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename: a crash leaves old or new, not empty
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
