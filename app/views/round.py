"""Round page: run a round (train → embed → kNN → propagate → suggest) with progress per stage,
cancel it, and see the metrics of every past round."""

from __future__ import annotations

import math
import time
from datetime import datetime

import pandas as pd
import streamlit as st

import state
from speler.config import apply_overrides
from speler.errors import SpelerError
from speler.round_metrics import LabelQuality, RoundMetrics
from speler.selection import STRATEGIES
from speler.train import MIN_HOLDOUT

annotator = state.current_annotator()
project = annotator.project  # display only: settings, counts, past rounds
store = project.store

_VC = annotator.config.views
EPOCHS_HELP = (
    "At most this many. The network is judged on human labels it never saw, by cross-fitting: "
    f"the labels are split in {_VC.judge_folds} folds, networks trained without one fold are "
    "scored on it after every epoch, the final network trains for the epoch count that scored "
    "best and joins the graph only if it beats the label-free views on those labels. With fewer "
    f"than {_VC.judge_min_labels} labels to hold out no network is trained: the round uses the "
    f"label-free views alone. Plain early stopping (views.network 'always') needs at least "
    f"{MIN_HOLDOUT} held-out human labels; with fewer, every epoch runs."
    if _VC.network == "auto" else
    f"At most this many. Training stops early only when at least {MIN_HOLDOUT} human labels can "
    "be held out to watch; with fewer, every epoch runs.")
PRETRAIN_HELP = (
    "Self-supervised training on every sample, labels unused, before the project's first "
    "training (0 = none). The weights are kept with the round and start every later training. "
    "On the five real sets we measured no gain in macro-F1 from 60 epochs, for about three times "
    "a round's time on a CPU.")


def _settings() -> None:
    """The settings expander; its values are read by ``_start`` (saved with the project when run)."""
    cfg = annotator.config
    job = state.round_job(annotator)
    busy = job is not None and job.running
    with st.expander("Settings for the next round", expanded=False):
        c1, c2, c3 = st.columns(3)
        # the values are read back by key in _start
        c1.number_input("Training epochs", min_value=1, max_value=500,
                        value=int(cfg.train.epochs), key="set_epochs", disabled=busy,
                        help=EPOCHS_HELP)
        c2.number_input("Suggestions per batch", min_value=1, max_value=100,
                        value=int(cfg.selection.batch), key="set_batch", disabled=busy)
        strategies = list(STRATEGIES)
        c3.selectbox("Suggestion strategy", strategies,
                     index=strategies.index(cfg.selection.strategy)
                     if cfg.selection.strategy in strategies else 0,
                     key="set_strategy", disabled=busy)
        c1.number_input("Self-supervised epochs", min_value=0, max_value=500,
                        value=int(cfg.train.pretrain_epochs), key="set_pretrain", disabled=busy,
                        help=PRETRAIN_HELP)


def _start() -> None:
    ss = st.session_state
    cfg = annotator.config
    overrides = [f"train.epochs={int(ss.get('set_epochs', cfg.train.epochs))}",
                 f"selection.batch={int(ss.get('set_batch', cfg.selection.batch))}",
                 f"selection.strategy={ss.get('set_strategy', cfg.selection.strategy)}",
                 f"train.pretrain_epochs={int(ss.get('set_pretrain', cfg.train.pretrain_epochs))}"]
    try:
        state.start_round(annotator, config=apply_overrides(cfg, overrides))
    except SpelerError as exc:
        state.flash("error", f"{exc}")


def _cancel() -> None:
    job = state.round_job(annotator)
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
            if stage == "train":  # the cross-fitted networks count too, and each may stop early
                text += (f" over all the round's networks (the cross-fitted ones, then the final "
                         f"one; up to {annotator.config.train.epochs} epochs each)")
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
        st.success(f"Round {res.round} done in {res.seconds:.0f} s: {_or_unknown(m.human_labels)} "
                   f"labels from people (given here or imported), {_or_unknown(m.reliable)} "
                   f"reliable propagated labels, "
                   f"{len(res.suggestions)} suggestions.")
        st.page_link("views/label.py", label="Label the suggestions", icon=":material/label:")


def _or_unknown(value) -> str:
    return "?" if value is None else str(value)


def _network_words(m: RoundMetrics) -> str:
    """What happened to the round's network, in words (no NaN: a missing number is explained)."""
    train, j = m.train, m.judgement
    why = "" if j is None else j.reason
    for head in ("joins: ", "stays out: "):
        why = why[len(head):] if why.startswith(head) else why
    if train is None:
        return (f"No network was trained ({why or 'none was asked for'}): the round used the "
                "label-free views alone.")
    best, epochs = train.best_metric, train.epochs
    finite = isinstance(best, (int, float)) and math.isfinite(best)
    if j is not None and j.epochs and finite:
        fit = (f"The network trained {epochs} epochs, the count that did best on held-out human "
               f"labels in cross-fitting (balanced accuracy {best:.3f}).")
    elif finite:
        fit = (f"The network trained {epochs} epochs and kept epoch {train.best_epoch} "
               f"(balanced accuracy {best:.3f} on held-out human labels).")
    else:
        fit = (f"The network trained all {epochs} epochs: early stopping needs at least "
               f"{MIN_HOLDOUT} held-out human labels.")
    if j is None:
        return fit
    where = "joins the graph" if j.joined else "stays out of the graph"
    return f"{fit} It {where}" + (f": {why}." if why else ".")


def _status(r) -> tuple[str, str]:
    """(status, note) of a past round as a person reads it: a round stopped with Cancel is
    'cancelled', one whose process died is 'interrupted', not 'failed'."""
    reason = (r.reason or "").strip()
    if r.status == "failed" and reason.startswith("CancelledError"):
        return "cancelled", ""  # the status says it all: Cancel saves nothing
    if r.status == "interrupted" or (r.status == "failed" and (
            reason == "interrupted" or reason.startswith("KeyboardInterrupt"))):
        return "interrupted", reason if reason not in ("", "interrupted") else \
            "the process running it ended; nothing was saved"
    return r.status, reason


def _superseded(job: state.Job) -> bool:
    """A round run from this app that ended before the project's latest done round (one run
    since on the command line or from another app): its outcome is old news."""
    if job.finished is None:
        return False
    ends = [datetime.fromisoformat(r.finished).timestamp() for r in store.rounds()
            if r.status == "done" and r.finished]
    return bool(ends) and max(ends) > job.finished + 1.0


def _cell(value, fmt: str = "{}") -> str:
    """A table cell: the formatted value, or empty when there is none (never 'None' or 'nan')."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return fmt.format(value)


state.title("Round", annotator)
state.show_flash()
left, right = st.columns([2, 3], gap="large")

with left:
    job = state.round_job(annotator)
    running_at_draw = job is not None and job.running
    last = store.last_done_round()
    nxt = 0 if last is None else last + 1
    _settings()
    if running_at_draw:
        st.button("Cancel round", key="cancel_round", on_click=_cancel, icon=":material/stop:",
                  disabled=job.cancel_event.is_set())
    else:
        given = store.human_labels() >= 0
        if not given.any():
            st.warning("No human labels yet: a round needs a few per class. The Label page shows "
                       "typical samples of the data to give them to.", icon=":material/label_off:")
            st.page_link("views/label.py", label="Give the first labels on the Label page",
                         icon=":material/label:")
        elif bool(given.all()):
            st.warning("Every sample already has a human label, so a round has nothing to "
                       "propagate or suggest. To label this data yourself, or to try SpeLER on "
                       "it, import it again on the Project page with **Labels in the data: Hide "
                       "them** (or the long-tailed split).", icon=":material/task_alt:")
        st.button(f"Run round {nxt}", key="run_round", type="primary", on_click=_start,
                  icon=":material/play_arrow:", disabled=not given.any(),
                  help=None if given.any() else "a round needs at least one human label")
        st.caption("Builds label-free views and their graph (the floor), trains the network on "
                   "the human labels plus reliable pseudo-labels, adds it to the graph only if "
                   "labels it never saw say it helps, then propagates and suggests what to label "
                   "next.")

    @st.fragment(run_every=1.0 if running_at_draw else None)
    def _progress() -> None:
        j = state.round_job(annotator)
        if j is None or _superseded(j):
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
            m = r.metrics or RoundMetrics()  # none: a round that measured nothing
            q = (m.quality.propagated if m.quality is not None else None) or LabelQuality()
            j = m.judgement
            status, note = _status(r)
            rows.append({
                "round": r.no, "status": status,
                "human labels": _cell(m.human_labels, "{:,}"),
                "reliable": _cell(m.reliable, "{:,}"),
                "accuracy": _cell(q.accuracy, "{:.3f}"),
                "macro-F1": _cell(q.macro_f1, "{:.3f}"),
                "tail recall": _cell(q.tail_recall, "{:.3f}"),
                "network": "" if j is None else "not trained" if m.train is None else (
                    "joined" if j.joined else "stayed out"),
                "seconds": _cell(m.seconds, "{:.0f}"),
                "finished": (r.finished or "")[5:16].replace("T", " "),  # MM-DD HH:MM
                "note": note,
            })
        # cells are text, empty where a round has no value (a cancelled round has no metrics);
        # columns that are empty in every row are left out
        table = pd.DataFrame(rows)
        table = table[[c for c in table.columns if (table[c].astype(str) != "").any()]]
        st.dataframe(table, hide_index=True, width="stretch")
        done = [r for r in rounds if r.status == "done" and r.metrics is not None]
        if done:  # what the network did, said once: here, beside the table
            st.caption(f"Round {done[-1].no}: {_network_words(done[-1].metrics)}")
        if any(r.metrics is not None and r.metrics.quality is not None for r in rounds):
            st.caption("Accuracy, macro-F1 and tail recall of the propagated labels of unlabeled "
                       "samples, against held-out truth the dataset carries (evaluation only).")
