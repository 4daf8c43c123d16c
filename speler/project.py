"""An annotation project: one folder ``<root>/<name>/`` holding everything about one dataset.

```
<root>/<name>/
    data.npz        the preprocessed SequenceSet (y_true, if any, only for evaluation)
    store.sqlite    label events and rounds (speler.store.LabelStore)
    config.json     the project's Config
    rounds/NNN/     one folder per finished round (appears by an atomic rename of rounds/.tmp-NNN)
    exports/        exported labels
```
The default root is ``annotations/`` at the repository root, or ``$SPELER_HOME`` when set.
A project is created in a temporary folder ``<root>/.tmp-<name>-<pid>-<hex>`` beside its final
place and renamed into place, so it exists complete or not at all; a temporary folder left by a
killed import is removed by the next ``Project.create`` (``clean_stale``). Replacing a project
(``overwrite``) renames the old folder aside to ``<root>/.old-<name>-<hex>`` and deletes it only
once the new one is in place, its label store last; if that is interrupted the error says where
what is left of it is, and a project folder found missing with its ``.old-*`` folder still there
(a crash between the two renames) is renamed back by ``clean_stale``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from speler import __version__
from speler.atomic_file import write_atomically
from speler.config import Config
from speler.data.schema import SequenceSet
from speler.errors import ConfigError, ProjectError
from speler.store import LabelStore, checkpoint_file
from speler.system import pid_alive

logger = logging.getLogger(__name__)

DATA_FILE = "data.npz"
STORE_FILE = "store.sqlite"
CONFIG_FILE = "config.json"
ROUNDS_DIR = "rounds"
ROUND_FILES = ("embeddings.npz", "propagation.npz", "metrics.json")  # a finished round has these
EXPORTS_DIR = "exports"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ROUND = re.compile(r"^\d{3,}$")
_TMP = re.compile(r"^\.tmp-(?P<name>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_OLD = re.compile(r"^\.old-(?P<name>.+)-[0-9a-f]{8}$")

#: A temporary import folder whose process is gone is removed at once; one whose owner cannot be
#: told (no pid in its name, or a pid alive but maybe reused) once it is this old (seconds).
STALE_TMP_SECONDS = 24 * 3600
STALE_TMP_UNKNOWN_SECONDS = 30 * 60


def default_root() -> Path:
    """``$SPELER_HOME`` if set, else ``annotations/`` at the repository root."""
    env = os.environ.get("SPELER_HOME")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "annotations"


def check_name(name: str) -> str:
    """``name`` if it is a valid project name (letters, digits, ``._-``, not starting with a dot)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProjectError(
            f"invalid project name {name!r}: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def clean_stale(root: str | Path | None = None) -> list[Path]:
    """Tidy what killed imports left in ``root``; returns the folders removed or restored.

    ``.tmp-<name>-<pid>-*`` folders are removed when their process is gone (or, failing that, when
    they are older than ``STALE_TMP_SECONDS``; older than ``STALE_TMP_UNKNOWN_SECONDS`` for names
    without a pid). An ``.old-<name>-*`` folder whose project ``<name>`` is missing is renamed back
    to ``<name>`` (a crash between the two renames of an overwrite); others are left for the user,
    with a warning, as they may hold the only copy of a replaced project's labels.
    """
    root = default_root() if root is None else Path(root)
    touched: list[Path] = []
    if not root.is_dir():
        return touched
    now = time.time()
    for p in sorted(root.iterdir()):
        if not p.name.startswith((".tmp-", ".old-")) or not p.is_dir():
            continue
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if p.name.startswith(".tmp-"):
            m = _TMP.match(p.name)
            if m is not None:
                stale = not pid_alive(int(m["pid"])) or age > STALE_TMP_SECONDS
            else:
                stale = age > STALE_TMP_UNKNOWN_SECONDS
            if stale:
                logger.warning("removing %s: an import that did not finish left it", p)
                _remove(p)
                touched.append(p)
            continue
        m = _OLD.match(p.name)
        if m is None:
            continue
        final = root / m["name"]
        if not final.exists() and _NAME.match(m["name"]):
            try:
                os.rename(p, final)
            except OSError as exc:
                logger.warning("%s: could not restore the project folder %s (%s)", p, final, exc)
                continue
            logger.warning("restored %s from %s: replacing it had been interrupted", final, p)
            touched.append(final)
        else:
            logger.warning("%s holds what is left of a replaced project %r; delete it once you no"
                           " longer need its labels", p, m["name"])
    return touched


def list_projects(root: str | Path | None = None) -> list[str]:
    """Names of the complete projects under ``root`` (default ``default_root()``), sorted."""
    root = default_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and _NAME.match(p.name) and (p / STORE_FILE).is_file()
        and (p / DATA_FILE).is_file()
    )


class Project:
    """An open project folder. Use ``Project.create``, ``Project.open`` or ``Project.open_path``.

    ``store`` is opened with the project; ``data`` is loaded on first use and checked against the
    store's dataset fingerprint. Close with ``close()`` or use as a context manager.
    """

    def __init__(self, path: Path, store: LabelStore, config: Config) -> None:
        # Trusts its arguments; open_path() validates.
        self.path = path
        self.name = path.name
        self._store = store
        self._config = config
        self._data: SequenceSet | None = None

    # -- creating and opening --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path | None,
        name: str,
        ds: SequenceSet,
        *,
        config: Config | None = None,
        labels_from: str | None = "file",
        preprocess: bool = True,
        overwrite: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> "Project":
        """Build ``<root>/<name>/`` from ``ds`` atomically and open it.

        ds: the SequenceSet as read (preprocessed here with ``config.preprocess`` unless
            ``preprocess=False``, for data that already is).
        labels_from: "file" writes the labels in ``ds.y`` (>= 0) as ``imported`` events; None
            imports no labels. ``ds.y_true`` is kept in data.npz for evaluation only.
        overwrite: replace an existing project of that name: the old folder is renamed aside and
            deleted only once the new one is in place (a KeyboardInterrupt during that deletion
            says where what is left of it, its label store last to go, is).
        meta: import provenance (source path, format, ...), kept in the store's meta table.
        ProjectError if the project exists and ``overwrite`` is False; on any error or Ctrl-C
        nothing is left behind.
        """
        check_name(name)
        if labels_from not in ("file", None):
            raise ProjectError(f"labels_from must be 'file' or None, got {labels_from!r}")
        config = Config() if config is None else config
        root = default_root() if root is None else Path(root)
        final = root / name
        if final.exists() and not overwrite:
            raise ProjectError(
                f"{final}: project {name!r} already exists (use overwrite to replace it)")
        if preprocess:
            from speler.data.transforms import preprocess as _preprocess

            ds = _preprocess(ds, config.preprocess)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(f"{root}: cannot create the projects folder ({exc})") from exc
        clean_stale(root)
        tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            ds.save(tmp / DATA_FILE)
            config.save(tmp / CONFIG_FILE)
            (tmp / ROUNDS_DIR).mkdir()
            (tmp / EXPORTS_DIR).mkdir()
            store_meta = {"project": name, "speler_version": __version__,
                          "layout": ds.layout.name, "shape": json.dumps(list(ds.shape))}
            store_meta.update({k: v if isinstance(v, str) else json.dumps(v, default=str)
                               for k, v in (meta or {}).items()})
            with LabelStore.create(tmp / STORE_FILE, ids=ds.ids.tolist(), classes=ds.classes,
                                   fingerprint=ds.fingerprint(), meta=store_meta) as store:
                if labels_from == "file":
                    known = np.flatnonzero(ds.y >= 0)
                    if len(known):
                        store.add_labels(zip(ds.ids[known].tolist(), ds.y[known].tolist()),
                                         source="imported", annotator="import")
            old = _install(tmp, final, overwrite=overwrite)
        except OSError as exc:
            _remove(tmp)
            raise ProjectError(f"{final}: cannot write the project ({exc})") from exc
        except BaseException:
            _remove(tmp)
            raise
        if old is not None:
            _discard_replaced(old, final)
        logger.info("created project %s: %d samples, %d classes", final, ds.n, ds.num_classes)
        return cls.open_path(final)

    @classmethod
    def open(cls, root: str | Path | None, name: str) -> "Project":
        """Open project ``name`` under ``root`` (default ``default_root()``); ``name`` must be a
        project name (``check_name``), never a path that would reach outside ``root``."""
        check_name(name)
        root = default_root() if root is None else Path(root)
        path = root / name
        if not path.is_dir():
            known = list_projects(root)
            hint = f"; projects there: {', '.join(known)}" if known else \
                "; there are no projects there"
            raise ProjectError(f"no project {name!r} in {root}{hint}")
        return cls.open_path(path)

    @classmethod
    def open_path(cls, path: str | Path) -> "Project":
        """Open the project folder at ``path``; ProjectError if it is missing or incomplete."""
        path = Path(path)
        if not path.is_dir():
            raise ProjectError(f"{path}: no project folder there")
        for f in (DATA_FILE, STORE_FILE, CONFIG_FILE):
            if not (path / f).is_file():
                raise ProjectError(f"{path}: project is incomplete, {f} is missing")
        config = _load_config(path / CONFIG_FILE)
        store = LabelStore.open(path / STORE_FILE)
        return cls(path, store, config)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r})"

    # -- contents --------------------------------------------------------------------------------
    @property
    def store(self) -> LabelStore:
        return self._store

    @property
    def config(self) -> Config:
        return self._config

    def save_config(self, config: Config) -> None:
        """Replace config.json (atomically) and ``self.config``."""
        write_atomically(self.path / CONFIG_FILE, lambda fh: fh.write(config.to_json().encode()))
        self._config = config

    @property
    def data(self) -> SequenceSet:
        """The preprocessed SequenceSet (loaded once); ProjectError if it is not the store's data."""
        if self._data is None:
            ds = SequenceSet.load(self.path / DATA_FILE)
            if ds.fingerprint() != self._store.fingerprint:
                raise ProjectError(
                    f"{self.path / DATA_FILE}: dataset fingerprint {ds.fingerprint()} does not match"
                    f" the label store's {self._store.fingerprint}"
                )
            self._data = ds
        return self._data

    @property
    def rounds_dir(self) -> Path:
        return self.path / ROUNDS_DIR

    @property
    def exports_dir(self) -> Path:
        return self.path / EXPORTS_DIR

    def round_dir(self, no: int) -> Path:
        """Final folder of round ``no``: ``rounds/NNN``."""
        return self.rounds_dir / f"{int(no):03d}"

    def begin_round_dir(self, no: int) -> Path:
        """A fresh, empty ``rounds/.tmp-NNN`` to write round ``no`` into (a stale one is removed)."""
        tmp = self.rounds_dir / f".tmp-{int(no):03d}"
        _remove(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finish_round_dir(self, no: int) -> Path:
        """Rename ``rounds/.tmp-NNN`` to ``rounds/NNN`` (replacing an older one); returns it."""
        tmp = self.rounds_dir / f".tmp-{int(no):03d}"
        if not tmp.is_dir():
            raise ProjectError(f"{tmp}: no round folder in progress for round {no}")
        old = _install(tmp, self.round_dir(no), overwrite=True)
        if old is not None:
            _remove(old)
        return self.round_dir(no)

    def latest_round(self) -> int | None:
        """The latest finished round: marked done in the store and complete on disk (its folder
        holds the embeddings, the propagation and the metrics); None before the first. The one
        definition everything uses (a round folder alone may be a leftover of a crash)."""
        done = sorted((r.no for r in self.store.rounds() if r.status == "done"), reverse=True)
        for no in done:
            d = self.round_dir(no)
            if all((d / f).is_file() for f in ROUND_FILES):
                return no
        return None


def _load_config(path: Path) -> Config:
    """The project's Config; ProjectError naming the file for anything but a valid JSON object."""
    try:
        text = path.read_bytes().decode("utf-8")
        raw = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{path}: invalid project config (byte {exc.start} is not UTF-8 text;"
                           " expected the JSON that SpeLER wrote)") from None
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{path}: invalid project config (not JSON: {exc}); expected the JSON"
                           " object SpeLER wrote") from None
    except OSError as exc:
        raise ProjectError(f"{path}: cannot read the project config ({exc})") from exc
    if not isinstance(raw, dict):
        got = {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
               int: "a JSON number", float: "a JSON number"}.get(type(raw), "JSON null")
        raise ProjectError(f"{path}: invalid project config ({got}, expected an object of sections"
                           " such as {\"train\": {...}})")
    prep = raw.get("preprocess")
    if isinstance(prep, dict):  # written by an earlier SpeLER: say how its data.npz was made
        if "scale" not in prep:  # before preprocess.scale: not scaled
            prep = {**prep, "scale": False}
        if isinstance(prep.get("normalize_series"), bool):  # before the choice: a clip's z-score
            prep = {**prep, "normalize_series": "clip" if prep["normalize_series"] else "none"}
        raw = {**raw, "preprocess": prep}
    try:
        return Config.from_dict(raw)
    except ConfigError as exc:
        raise ProjectError(f"{path}: invalid project config ({exc})") from exc
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ProjectError(f"{path}: invalid project config ({type(exc).__name__}: {exc})") from exc


def _install(tmp: Path, final: Path, *, overwrite: bool) -> Path | None:
    """Rename folder ``tmp`` to ``final``. With ``overwrite`` an existing ``final`` is first renamed
    aside to ``.old-<name>-<hex>`` and that path returned, for the caller to delete once the new
    folder is in place; if putting ``tmp`` in place fails or is interrupted, it is renamed back."""
    if final.exists():
        if not overwrite:
            raise ProjectError(f"{final}: already exists")
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if not final.exists():
                os.rename(old, final)
            raise
        return old
    os.rename(tmp, final)
    return None


def _discard_replaced(old: Path, final: Path) -> None:
    """Delete ``old``, the project folder ``final`` replaced: everything else first, its label store
    last, so an interruption leaves the labels readable. On Ctrl-C the KeyboardInterrupt says where
    what is left is; a failure to delete is only a warning (the new project is in place)."""
    store = old / STORE_FILE
    try:
        whole = checkpoint_file(store)  # the labels in the write-ahead log go into the file
        for p in list(old.iterdir()):
            if not p.name.startswith(STORE_FILE):
                _remove(p, strict=True)
        if whole:
            for suffix in ("-shm", "-wal", "-journal"):
                (old / f"{STORE_FILE}{suffix}").unlink(missing_ok=True)
        store.unlink(missing_ok=True)
        for p in list(old.iterdir()):
            _remove(p, strict=True)
        old.rmdir()
    except KeyboardInterrupt:
        kept = (f"its label store {store} is still there" if store.exists()
                else "its label store was already deleted")
        raise KeyboardInterrupt(
            f"{final} holds the new project; the project it replaced was being deleted when"
            f" interrupted and what is left of it is in {old} ({kept}); delete that folder once"
            " you no longer need it") from None
    except OSError as exc:
        logger.warning("%s: could not delete the replaced project (%s); delete it by hand", old, exc)


def _remove(path: Path, *, strict: bool = False) -> None:
    """Delete a file or folder tree; errors are ignored unless ``strict``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=not strict)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            if strict:
                raise
