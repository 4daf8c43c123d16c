"""Export page: the label table with provenance, downloads as CSV / JSON / npz / PYSKL pickle, and
the latest model checkpoint. Files are made by ``Annotator.export`` when a button is clicked, from
the live state, so they are the CLI's ``export`` byte for byte."""

from __future__ import annotations

import logging

import streamlit as st

import state
from speler.annotator import Annotator
from speler.errors import SpelerError
from speler.export import EXTENSIONS, FORMATS

logger = logging.getLogger("speler.app")

annotator = state.current_annotator()
project = annotator.project  # display only: rounds, checkpoint, exports folder
NAME = annotator.name
MIME = {"csv": "text/csv", "json": "application/json", "npz": "application/octet-stream",
        "pyskl": "application/octet-stream"}
WHAT = {"csv": "one row per sample", "json": "rows plus a header with counts",
        "npz": "arrays, for numpy",
        "pyskl": "PYSKL annotation pickle with the data as the project holds it (resampled,"
                 " centred, turned and scaled)"}


def _export_bytes(ann: Annotator, fmt: str):
    """A callable for st.download_button: ``ann.export`` when clicked (to the project's exports
    folder, where the file is kept), from the live labels; the file's bytes go to the browser."""

    def make() -> bytes:  # runs outside the script run: no Streamlit calls
        try:
            return ann.export(format=fmt).read_bytes()
        except Exception:
            logger.exception("export of %s as %s failed", ann.name, fmt)
            raise

    return make


state.title("Export", annotator)
with state.user_error("Run a new round on the Round page if the project changed."):
    table = annotator.label_table()

counts = table["source"].value_counts()
cols = st.columns(4)
SOURCES = {  # the export's source column: what each count is
    "human": ("Labeled by people here", "given in this project (app or command line)"),
    "imported": ("Labeled by people, imported", "came with the data or a labels CSV; they count "
                 "as human labels everywhere else"),
    "propagated": ("Propagated", "from the latest round's graph, with energy and margin"),
    "none": ("No label", "reached by no labeled sample"),
}
for col, (source, (label, why)) in zip(cols, SOURCES.items()):
    col.metric(label, f"{int(counts.get(source, 0)):,}", help=f"source '{source}': {why}")

left, right = st.columns([1, 3], gap="large")
with left:
    st.subheader("Download")
    refused = {}
    for fmt in FORMATS:
        try:  # the files are made when clicked, outside this run: refuse what cannot work now
            annotator.check_export(format=fmt)
        except SpelerError as exc:
            refused[fmt] = str(exc)
        st.download_button(
            f"{fmt.upper()}", data=_export_bytes(annotator, fmt), file_name=f"{NAME}-labels{EXTENSIONS[fmt]}",
            mime=MIME.get(fmt), key=f"download_{fmt}", on_click="ignore", width="stretch",
            icon=":material/download:", help=refused.get(fmt, WHAT.get(fmt)),
            disabled=fmt in refused,
        )
    for why in refused.values():
        st.error(f"{why}.", icon=":material/block:")
    last = project.latest_round()
    ckpt = None if last is None else project.round_dir(last) / "checkpoint.pt"
    if ckpt is not None and ckpt.is_file():
        st.download_button(
            f"Checkpoint (round {last})", data=ckpt.read_bytes, file_name=f"{NAME}-round{last:03d}.pt",
            mime="application/octet-stream", key="download_checkpoint", on_click="ignore",
            width="stretch", icon=":material/model_training:",
        )
    else:
        st.caption("No checkpoint yet: it comes with the first round." if last is None else
                   f"No checkpoint: round {last} trained no network (views.network is 'never', "
                   f"or too few human labels to judge one).")
    st.caption(f"Files are also kept in `{project.exports_dir}`.")

with right:
    st.subheader("Labels")
    # <NA> rounds (labels people gave) as empty cells, not "None"
    shown = table.assign(round=table["round"].astype("string").fillna(""))
    st.dataframe(shown, hide_index=True, width="stretch", height=420,
                 column_config={"energy": st.column_config.NumberColumn(format="%.2f"),
                                "margin": st.column_config.NumberColumn(format="%.3f"),
                                "round": st.column_config.TextColumn(
                                    help="the round that propagated the label; empty for "
                                         "labels people gave")})
    if "true_label_eval_only" in table.columns:
        st.caption("`true_label_eval_only` is the held-out truth the dataset carries, for "
                   "evaluation only; no one gave these labels.")
