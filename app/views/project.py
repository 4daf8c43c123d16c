"""Project page: open a bundled sample or an existing project, or import data; see its classes."""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import state
from speler.annotator import Annotator, import_project
from speler.errors import AccessError, DataFormatError, ProjectError, SpelerError
from speler.project import check_name, list_projects
from speler.server_paths import ENV as DATA_DIRS_ENV
from speler.server_paths import check_data_path, data_dirs

# Larger data: put it on the server and import it by path. (Streamlit's own server.maxUploadSize,
# 200 MB by default, stops bigger files in the browser already.)
MAX_UPLOAD_MB = float(os.environ.get("SPELER_MAX_UPLOAD_MB", "200"))


def _open_sample(name: str) -> None:
    try:
        state.open_sample(name)
        state.select_project(name)
    except SpelerError as exc:
        state.flash("error", f"{exc}\n\nThe bundled sample could not be opened; check the installation.")


def _pick_project() -> None:
    name = st.session_state.get("pick_project")
    if name:
        state.select_project(name)


def _suggest_name(filename: str) -> str:
    stem = Path(filename).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:64]
    return stem or "imported"


ALL_LABELED = ("Every sample already has a human label (imported with the data), so there is "
               "nothing to suggest or propagate. To label this data yourself, or to try SpeLER on "
               "it, import it again with **Labels in the data: Hide them** (or the long-tailed "
               "split).")

NO_LABELS = ("No human labels yet, and a round needs some (a few per class) before it can "
             "suggest anything. Give the first ones on the Label page, which shows typical "
             "samples of the data until the first round (or on the command line: `python -m "
             "speler label {name} ID CLASS`, or `import --labels` with a CSV).")

# What to do with the labels the data carry (the CLI's --no-file-labels and --protocol-* options).
LABELS = {
    "keep": "Keep them (they count as human labels)",
    "hide": "Hide them: start unlabeled",
    "protocol": "Hide most: long-tailed split (experiments)",
}


@dataclass(frozen=True)
class ImportForm:
    """What the import form asked for; ``protocol`` = (imbalance π, labeled share γ, seed)."""

    name: str
    fmt: str | None
    overwrite: bool
    labels: str = "keep"
    protocol: tuple[float, float, int] | None = None


def _import(source: Path, form: ImportForm, *, where: str) -> None:
    """``import_project`` of ``source`` with the form's options (the CLI's ``import --format /
    --no-file-labels / --protocol-* / --overwrite``); errors as st.error."""
    name, overwrite = form.name, form.overwrite
    r = state.root()
    if (r / name).exists() and not overwrite:
        raise ProjectError(f"a project named {name!r} exists already in {r}; pick another name "
                           "or tick 'Replace an existing project'")
    bar = st.progress(0.0, text=f"Reading {where}…")

    def progress(done: int, total: int) -> None:
        if done >= total:  # read: what is left is preprocessing and writing
            bar.progress(1.0, text="Preprocessing the samples and writing the project…")
        else:
            bar.progress(done / max(total, 1), text=f"Reading {where}: {done}/{total}")

    res = import_project(
        r, name, path=source, format=form.fmt, source=where, overwrite=overwrite,
        no_file_labels=form.labels == "hide",
        protocol=form.protocol if form.labels == "protocol" else None, progress=progress)
    with res.annotator as ann:  # the pages open it again through state's shared cache
        store = ann.project.store
        n, classes, n_lab = store.n, len(store.classes), int((store.human_labels() >= 0).sum())
    bar.empty()
    state.select_project(name)
    state.flash("success", f"Imported {n} samples ({classes} classes, {n_lab} labeled) "
                           f"into project {name}.")
    st.rerun()


def _import_form(prefix: str, suggested: str) -> ImportForm:
    """Name, format, replace, and what to do with the data's labels. The name is prefilled from
    the file (``suggested``) whenever another file or path is picked; the person may change it."""
    from speler.formats import DESCRIPTIONS, FORMATS

    ss = st.session_state
    if ss.get(f"{prefix}_suggested") != suggested:  # a new file: prefill its name
        ss[f"{prefix}_suggested"] = suggested
        ss[f"{prefix}_name"] = suggested
    c1, c2 = st.columns(2)
    name = c1.text_input("Project name", key=f"{prefix}_name",
                         help="letters, digits, '.', '_' or '-'")
    options = ["detect"] + sorted(FORMATS)
    fmt = c2.selectbox("Format", options, key=f"{prefix}_format",
                       format_func=lambda f: "detect from the file" if f == "detect"
                       else f"{f}: {DESCRIPTIONS.get(f, f)}",
                       help="pick the reader yourself if detection fails")
    labels = st.selectbox("Labels in the data", list(LABELS), key=f"{prefix}_labels",
                          format_func=LABELS.get,
                          help="A fully labeled dataset leaves nothing to suggest: hide its "
                               "labels to label it yourself or to try SpeLER on it. Hidden labels "
                               "stay in the project as truth for evaluation only (the CLI's "
                               "import --no-file-labels and --protocol-* options).")
    protocol = None
    if labels == "protocol":
        p1, p2, p3 = st.columns(3)
        pi = p1.number_input("Imbalance π", min_value=1.0, max_value=1000.0, value=10.0,
                             key=f"{prefix}_pi",
                             help="class sizes n₁·π^(−(c−1)/(C−1)): the largest class is π "
                                  "times the smallest")
        gamma = p2.number_input("Labeled share γ", min_value=0.01, max_value=1.0, value=0.1,
                                step=0.05, key=f"{prefix}_gamma",
                                help="share of the kept samples whose labels stay visible")
        seed = p3.number_input("Seed", min_value=0, value=0, step=1, key=f"{prefix}_seed")
        protocol = (float(pi), float(gamma), int(seed))
    overwrite = st.checkbox("Replace an existing project of that name", key=f"{prefix}_overwrite")
    return ImportForm(name=name.strip(), fmt=None if fmt == "detect" else fmt,
                      overwrite=overwrite, labels=labels, protocol=protocol)


def _name_ok(form: ImportForm) -> bool:
    """st.error and False when the project name is empty or not allowed (before any reading)."""
    if not form.name:
        st.error("Give the project a name (letters, digits, '.', '_' or '-'); nothing was "
                 "imported.", icon=":material/error:")
        return False
    check_name(form.name)  # ProjectError saying what is allowed, shown by _guarded
    return True


def _upload_tab() -> None:
    up = st.file_uploader(
        f"Data file (at most {MAX_UPLOAD_MB:g} MB; a .zip for a folder of files)", key="upload",
        help="any format speler reads (see Format), or a zip of a folder of such files",
    )
    form = _import_form("upload", _suggest_name(up.name) if up else "")
    if not st.button("Import upload", key="upload_go", disabled=up is None, type="primary"):
        return
    if not _name_ok(form):
        return
    size_mb = up.size / 2**20
    if size_mb > MAX_UPLOAD_MB:
        st.error(f"{up.name} is {size_mb:.1f} MB; uploads are capped at {MAX_UPLOAD_MB:g} MB. "
                 "Copy the file to the server and import it with 'Server path' instead.")
        return
    with tempfile.TemporaryDirectory(prefix="speler-upload-") as tmp:
        path = Path(tmp) / Path(up.name).name
        path.write_bytes(up.getbuffer())
        if path.suffix.lower() == ".zip":
            folder = Path(tmp) / "unzipped"
            try:
                with zipfile.ZipFile(path) as z:
                    for member in z.namelist():  # no absolute paths or '..' out of the folder
                        if member.startswith("/") or ".." in Path(member).parts:
                            raise DataFormatError(f"{up.name}: unsafe path {member!r} in the zip")
                    z.extractall(folder)
            except zipfile.BadZipFile as exc:
                raise DataFormatError(f"{up.name}: not a readable zip ({exc})") from None
            entries = list(folder.iterdir())
            path = entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
        _import(path, form, where=f"upload:{up.name}")


def _path_tab() -> None:
    allowed = data_dirs()
    raw = st.text_input("File or folder on the server", key="server_path",
                        placeholder=str(allowed[0]) if allowed else "/data/ntu/nturgb+d_skeletons",
                        help=f"inside one of the data folders set by {DATA_DIRS_ENV}; a "
                             f"relative path is read from them")
    st.caption("Data folders: " + (", ".join(f"`{d}`" for d in allowed) + " (a relative path "
                                   "is read from them)" if allowed else
                                   f"none (set {DATA_DIRS_ENV} where the app is started)"))
    form = _import_form("path", _suggest_name(raw.strip().rstrip("/")) if raw.strip() else "")
    if not st.button("Import path", key="path_go", disabled=not raw.strip(), type="primary"):
        return
    if not _name_ok(form):
        return
    path = check_data_path(raw)  # before anything about the path is looked at
    if not path.exists():
        raise DataFormatError(f"{raw.strip()}: no such file or folder on the server")
    _import(path, form, where=str(path))


def _guarded(tab) -> None:
    try:
        tab()
    except AccessError as exc:
        state.show_error(exc, "Nothing was imported.")
    except SpelerError as exc:
        state.show_error(exc, "Nothing was imported. Check the file, or pick its format explicitly.")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        # A reader tripped over the file before it could say why: still the user's file.
        state.show_error(exc, "Nothing was imported: the file could not be read. "
                              "Check it, or pick its format explicitly.")


def _overview(annotator: Annotator) -> None:
    project = annotator.project
    ds = project.data
    store = project.store
    cur = store.current_labels()
    C = ds.num_classes
    counts = {src: np.bincount(cur.label[cur.source == src], minlength=C)
              for src in ("human", "imported", "propagated")}
    human = np.isin(cur.source, ("human", "imported"))
    prop = cur.source == "propagated"
    n_none = int((cur.source == "none").sum())
    last = store.last_done_round()

    st.subheader(project.name)
    n, c, t, v, m = ds.shape
    what = "series" if ds.layout.is_series else f"{ds.layout.name} skeletons ({v} joints, " + (f"up to {m} persons)" if m > 1 else "1 person)")
    st.caption(f"{what} · {t} frames · source {store.meta.get('source', 'unknown')}")
    cols = st.columns(5)
    cols[0].metric("Samples", f"{n:,}")
    cols[1].metric("Classes", C)
    cols[2].metric("Labeled", f"{int(human.sum()):,}", help="by people: in the app or imported with the data")
    cols[3].metric("Propagated", f"{int(prop.sum()):,}")
    cols[4].metric("Rounds done", 0 if last is None else last + 1)
    if n_none and last is not None:
        st.caption(f"{n_none:,} samples have no label at all.")
    if human.all():
        st.warning(ALL_LABELED, icon=":material/task_alt:")
    elif not human.any():
        st.warning(NO_LABELS.format(name=project.name), icon=":material/label_off:")
    shown = {k: v for k, v in counts.items() if v.any()} or {"human": counts["human"]}
    st.markdown("**Samples per class**, by where their label comes from (log scale)"
                if last is not None else "**Labels per class** (log scale; the classes' sizes "
                "are unknown until labels spread in a round)")
    st.plotly_chart(state.class_counts_figure(ds.classes, shown), key="class_counts")
    with st.expander("Classes as a table"):
        st.dataframe(pd.DataFrame({"class": ds.classes, **counts}), hide_index=True, width="stretch")


st.title("Project")
state.show_flash()
left, right = st.columns([2, 3], gap="large")

with left:
    projects = list_projects(state.root())
    current = state.current_name()
    if projects:
        if st.session_state.get("pick_project") != current:
            st.session_state["pick_project"] = current
        st.selectbox("Open a project", projects, key="pick_project", on_change=_pick_project)
    else:
        st.info("No projects yet: open a bundled sample or import your data below.")

    from speler.data.samples import list_samples

    st.markdown("**Bundled samples**")
    for info in list_samples():
        row = st.columns([4, 1], vertical_alignment="center")
        row[0].markdown(f"**{info.title}**  \n<span style='font-size:0.85em;color:#666'>"
                        f"{info.kind} · {info.description}</span>", unsafe_allow_html=True)
        row[1].button("Open", key=f"sample_{info.name}", on_click=_open_sample, args=(info.name,))

    st.markdown("**Import your data**")
    # keyed and stateful, so the tab in use stays open after an import reruns the page
    tab_up, tab_path = st.tabs(["Upload", "Server path"], key="import_tab", on_change="rerun")
    with tab_up:
        _guarded(_upload_tab)
    with tab_path:
        _guarded(_path_tab)

with right:
    if current is not None:
        annotator = state.current_annotator()
        with state.user_error("The project folder looks damaged; import the data again."):
            _overview(annotator)
