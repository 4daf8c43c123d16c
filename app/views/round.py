"""Round page: run a round (train → embed → kNN → propagate → suggest) with progress per stage,
cancel it, and see the metrics of every past round."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app import state
from speler.config import apply_overrides
from speler.errors import SpelerError
from speler.selection import STRATEGIES

project = state.current_project()
store = project.store


def _settings() -> None:
    """The settings expander; its values are read by ``_start`` (saved with the project when run)."""
    cfg = project.config
    job = state.round_job(project)
    busy = job is not None and job.running
    with st.expander("Settings for the next round", expanded=False):
        c1, c2, c3 = st.columns(3)
        epochs = c1.number_input("Training epochs", min_value=1, max_value=500,
                                 value=int(cfg.train.epochs), key="set_epochs", disabled=busy,
                                 help="upper bound; training stops early when held-out accuracy stalls")
        batch = c2.number_input("Suggestions per batch", min_value=1, max_value=100,
                                value=int(cfg.selection.batch), key="set_batch", disabled=busy)
        strategies = list(STRATEGIES)
        strategy = c3.selectbox("Suggestion strategy", strategies,
                                index=strategies.index(cfg.selection.strategy)
                                if cfg.selection.strategy in strategies else 0,
                                key="set_strategy", disabled=busy)


def _start() -> None:
    ss = st.session_state
    cfg = project.config
    overrides = [f"train.epochs={int(ss.get('set_epochs', cfg.train.epochs))}",
                 f"selection.batch={int(ss.get('set_batch', cfg.selection.batch))}",
                 f"selection.strategy={ss.get('set_strategy', cfg.selection.strategy)}"]
    try:
        config = apply_overrides(cfg, overrides)
        if config != project.config:
            project.save_config(config)
        state.start_round(project, config=config)
    except SpelerError as exc:
        state.flash("error", f"{exc}")


def _cancel() -> None:
    job = state.round_job(project)
    if job is not None and job.running:
        job.cancel_event.set()


def _stage_bars(job: state.Job) -> None:
    """One bar per stage: done before the current one, live on it, waiting after it."""
    cur = state.STAGES.index(job.stage) if job.stage in state.STAGES else -1
    units = {"views": "view", "train": "epoch", "embed": "samples", "knn": "step", "propagate": "step",
             "suggest": "step"}
    for i, stage in enumerate(state.STAGES):
        title = state.STAGE_TITLES[stage]
        done, total = job.progress.get(stage, (0, 0))
        if job.result is not None or i < cur:
            frac, text = 1.0, f"{title}: done"
        elif i == cur:
            frac = min(1.0, done / total) if total else 0.0
            text = f"{title}: {units[stage]} {done}/{total}"
            if job.running:
                text += f" · {time.time() - job.stage_started.get(stage, time.time()):.0f} s"
            else:
                text += " · stopped"
        else:
            frac, text = 0.0, f"{title}: waiting" if job.running else f"{title}: not reached"
        st.progress(frac, text=text)


def _outcome(job: state.Job) -> None:
    if job.running:
        elapsed = time.time() - job.started
        st.info(f"Round running for {elapsed:.0f} s. You can switch pages; it keeps going.",
                icon=":material/hourglass_top:")
    elif job.cancelled:
        st.warning("Round cancelled; nothing was saved. The previous round is unchanged.")
    elif job.error:
        st.error(f"The round failed: {job.error}\n\nNothing was saved; the previous round is "
                 "unchanged. Fix the cause and run it again.")
    elif job.result is not None:
        res = job.result
        m = res.metrics
        st.success(f"Round {res.round} done in {res.seconds:.0f} s: {m.get('human_labels', '?')} human "
                   f"labels, {m.get('reliable', '?')} reliable propagated labels, "
                   f"{len(res.suggestions)} suggestions.")
        st.page_link("views/label.py", label="Label the suggestions", icon=":material/label:")


state.title("Round", project)
state.show_flash()
left, right = st.columns([2, 3], gap="large")

with left:
    job = state.round_job(project)
    running_at_draw = job is not None and job.running
    last = store.last_done_round()
    nxt = 0 if last is None else last + 1
    _settings()
    if running_at_draw:
        st.button("Cancel round", key="cancel_round", on_click=_cancel, icon=":material/stop:",
                  disabled=job.cancel_event.is_set())
    else:
        st.button(f"Run round {nxt}", key="run_round", type="primary", on_click=_start,
                  icon=":material/play_arrow:")
        st.caption("Builds label-free views and their graph (the floor), trains the network on "
                   "the human labels plus reliable pseudo-labels, adds it to the graph only if "
                   "labels it never saw say it helps, then propagates and suggests what to label "
                   "next.")

    @st.fragment(run_every=1.0 if running_at_draw else None)
    def _progress() -> None:
        j = state.round_job(project)
        if j is None:
            return
        if running_at_draw and not j.running:
            st.rerun(scope="app")  # the round ended: redraw the whole page once
        _stage_bars(j)
        _outcome(j)

    _progress()

with right:
    st.subheader("Past rounds")
    rounds = store.rounds()
    if not rounds:
        st.info("No round yet. Run round 0: it trains on the labels you have now.")
    else:
        rows = []
        for r in rounds:
            m = r.metrics or {}
            q = (m.get("quality") or {}).get("propagated") or {}
            rows.append({
                "round": r.no, "status": r.status,
                "human labels": m.get("human_labels"), "reliable": m.get("reliable"),
                "accuracy": q.get("accuracy"), "macro-F1": q.get("macro_f1"),
                "tail recall": q.get("tail_recall"),
                "network": ((m.get("judgement") or {}).get("joined") and "joined") or (
                    "out" if m.get("judgement") else None),
                "seconds": m.get("seconds"), "finished": (r.finished or "")[:19].replace("T", " "),
                "note": r.reason or None,
            })
        table = pd.DataFrame(rows)
        st.dataframe(table.dropna(axis=1, how="all"), hide_index=True, width="stretch",
                     column_config={
                         "accuracy": st.column_config.NumberColumn(format="%.3f"),
                         "macro-F1": st.column_config.NumberColumn(format="%.3f"),
                         "tail recall": st.column_config.NumberColumn(format="%.3f"),
                         "seconds": st.column_config.NumberColumn(format="%.0f"),
                     })
        if any((r.metrics or {}).get("quality") for r in rounds):
            st.caption("Accuracy, macro-F1 and tail recall of the propagated labels of unlabeled "
                       "samples, against held-out truth the dataset carries (evaluation only).")
