"""SpeLER's front door: ``streamlit run app/main.py``.

Opens on the bundled skeleton sample with nothing to configure (the project is created on first
start). The pages (app/views/) are thin views over ``speler``: Project, Round, Label, Diagnostics, Export.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import state  # app/state.py: `streamlit run` puts the script's folder, app/, on the path

st.set_page_config(page_title="SpeLER", page_icon=":material/label:", layout="wide",
                   initial_sidebar_state="collapsed")

# Not "pages/": that folder name switches Streamlit to its legacy multipage mode, where a deep link
# such as /label runs the page without this script.
_VIEWS = Path(__file__).resolve().parent / "views"
pages = [
    st.Page(_VIEWS / "project.py", title="Project", icon=":material/folder_open:", default=True),
    st.Page(_VIEWS / "round.py", title="Round", icon=":material/model_training:"),
    st.Page(_VIEWS / "label.py", title="Label", icon=":material/label:"),
    st.Page(_VIEWS / "diagnostics.py", title="Diagnostics", icon=":material/insights:"),
    st.Page(_VIEWS / "export.py", title="Export", icon=":material/download:"),
]
page = st.navigation(pages, position="top")
# Tighter than Streamlit's defaults so a page fits a 1280×800 screen.
st.html("""<style>
[data-testid="stMainBlockContainer"] {padding-top: 3.2rem; padding-bottom: 2rem;
                                      padding-left: 2.5rem; padding-right: 2.5rem;}
h1 {font-size: 2rem !important; padding-top: 0.2rem !important;}
h2 {font-size: 1.35rem !important;}
[data-testid="stMain"]:focus::before {box-shadow: none !important;}  /* no frame after a click */
</style>""")

state.ensure_default_project()
state.person()  # the annotator's name back into the address, whatever the page

page.run()
