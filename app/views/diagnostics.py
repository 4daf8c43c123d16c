"""Diagnostics page: is imbalance distorting propagation (spectrum before/after balancing), how
confident is it per class (energy histograms with thresholds), how fast does labeling pay off
(accuracy / macro-F1 vs human labels), and which human labels deserve a second look (doubts)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

import state
from speler.errors import SpelerError

annotator = state.current_annotator()

state.title("Diagnostics", annotator)
state.show_flash()
with state.user_error("Run a new round on the Round page if the project changed."):
    ds = annotator.data
    live = annotator.state()
if live is None:
    st.info(f"Diagnostics need a round of project {annotator.name}: run round 0 first.")
    st.page_link("views/round.py", label="Go to Round", icon=":material/model_training:")
    st.stop()

classes = ds.classes
colors = state.class_colors(classes)
res = live.result
key = state.project_key(annotator)
h = state.labels_hash(live.human)

top_left, top_right = st.columns(2, gap="large")
with top_left:
    st.subheader("Spectrum of the affinity")
    with state.user_error("The spectrum could not be computed for this graph.", stop=False):
        fig, before, after = state.spectrum_figure(annotator, live)
        st.plotly_chart(fig, key="spectrum")
        st.caption(
            "Eigenvalue density of the normalised affinity S of the graph the propagation ran "
            "on, before and after spectral balancing. Balancing reweights the nodes, which "
            "reshapes the density but never changes how many eigenvalues are negative (a "
            "congruence keeps the inertia). Within a class the weights cancel in the "
            "normalisation, so only edges between classes change: the more the classes mix in "
            "the graph, the more the shape moves. Compare the shape and the extremes: second "
            f"largest eigenvalue {before['lambda_2']:.3f} → {after['lambda_2']:.3f}, smallest "
            f"{before['lambda_min']:.3f} → {after['lambda_min']:.3f}.")
with top_right:
    st.subheader("Energy per class")
    if not (live.human < 0).any():
        st.info("Every sample has a label from people, so nothing is propagated and there is no "
                "energy to show.", icon=":material/task_alt:")
    else:
        st.plotly_chart(state.energy_figure(key, live.round, h, res, classes), key="energy")
    st.caption("Energy of each propagated label under its class (lower = better connected to the "
               "labeled set; your own labels are left out). Dashed lines are the per-class "
               "reliability thresholds: a label below its class's line is reliable, one the network "
               "trains on, weighted by how low it is.")

bottom_left, bottom_right = st.columns(2, gap="large")
def _simulation() -> None:
    """Curves of simulated annotation per strategy (run here in the background, or saved)."""
    has_truth = ds.y_true is not None and bool((ds.y_true >= 0).all())
    job = state.job(annotator, "simulation")
    running = job is not None and job.running
    saved = annotator.saved_simulation()
    if saved and saved.get("curves"):
        curves = {s: ([r["labels"] for r in rows], [r["macro_f1"] for r in rows])
                  for s, rows in saved["curves"].items()}
        st.plotly_chart(state.curves_figure(curves, y_title="macro-F1, samples not yet labeled"),
                        key="sim_curves")
        auc = sorted(saved.get("auc", {}).items(), key=lambda kv: -kv[1])
        st.caption("Simulated annotator answering each strategy's suggestions from the held-out "
                   f"truth, {state.SIM_BUDGET} labels per round; each point scores the propagated "
                   "labels of the samples nobody has labeled yet. Area under the curve (mean "
                   "macro-F1 over the label counts): "
                   + ", ".join(f"{s} {v:.3f}" for s, v in auc) + ".")
    elif has_truth:
        st.caption("Compare the suggestion strategies by simulating an annotator who answers from "
                   "the held-out truth (trains one model, then labels "
                   f"{state.SIM_ROUNDS} × {state.SIM_BUDGET} samples per strategy).")
    if not has_truth:
        st.info("Simulation needs held-out truth for every sample, which this dataset does not "
                "carry. Run `python -m speler simulate` on a fully labeled copy instead.")
        return
    if running:
        st.button("Cancel simulation", key="sim_cancel", on_click=job.cancel_event.set)
    else:
        st.button("Simulate strategies" if not saved else "Simulate again", key="sim_run",
                  on_click=_start_simulation, icon=":material/science:")

    @st.fragment(run_every=1.0 if running else None)
    def _sim_progress() -> None:
        j = state.job(annotator, "simulation")
        if j is None:
            return
        if running and not j.running:
            st.rerun(scope="app")
        if j.running:
            done, total = j.progress.get("simulate", (0, 0))
            secs = time.time() - j.started
            text = (f"Simulating: {done}/{total} rounds · {secs:.0f} s" if total
                    else f"Training the shared model · {secs:.0f} s")
            st.progress(done / total if total else 0.0, text=text)
        elif j.cancelled:
            st.warning("Simulation cancelled; the previous curves are kept.")
        elif j.error:
            st.error(f"The simulation failed: {j.error}")

    _sim_progress()


def _views_section() -> None:
    """The views in the round's graph, and the cross-fitted judgement of the network."""
    st.markdown("Views in the graph and their weights: " + ", ".join(
        f"**{v}** {w:.2f}" for v, w in live.weights.items()))
    j = None if live.metrics is None else live.metrics.judgement
    if j is None:
        return
    st.markdown(f"Network ({j.mode}): {j.reason}.")
    if j.folds:
        rows = [{"fold": str(i + 1), "held-out human labels": f.held_out,
                 "floor": f.floor, "floor + network": f.with_network}
                for i, f in enumerate(j.folds)]
        rows.append({"fold": "all, pooled", "held-out human labels": j.held_out,
                     "floor": j.floor, "floor + network": j.with_network})
        st.dataframe(pd.DataFrame(rows), hide_index=True,
                     column_config={c: st.column_config.NumberColumn(format="%.3f")
                                    for c in ("floor", "floor + network")})
        st.caption("Balanced accuracy on human labels held out of the network's training and of "
                   "the propagation's seeds (cross-fitting), per fold and over all of them pooled "
                   "(the figures in the sentence above): the network joins the label-free floor "
                   "only when it predicts labels it never saw at least as well overall (a tie "
                   "joins) and worse in no fold.")


def _start_simulation() -> None:
    try:
        state.start_simulation(annotator)
    except SpelerError as exc:
        state.flash("error", f"{exc}")


with bottom_left:
    st.subheader("Label quality vs human labels")
    tab_rounds, tab_sim = st.tabs(["This project", "Simulated strategies"])
    with tab_rounds:
        points = annotator.quality_curve()  # human labels -> quality, after each round and now
        if points:
            xs = sorted(points)
            curves = {name: (xs, [points[x][metric] for x in xs])
                      for name, metric in (("accuracy", "accuracy"), ("macro-F1", "macro_f1"))}
            st.plotly_chart(state.curves_figure(curves), key="curves")
            st.caption("Propagated labels of the samples nobody labeled, after each round and now, "
                       "scored against the held-out truth the dataset carries (evaluation only; "
                       "never used for training).")
        else:
            st.info("This dataset carries no held-out truth, so label quality cannot be measured "
                    "here.")
    with tab_sim:
        _simulation()

with bottom_right:
    st.subheader("Label doubts")
    with state.user_error("Doubts could not be computed.", stop=False):
        found = annotator.doubts(top=20)
        if not found:
            st.success("The graph agrees with every human label.")
        else:
            st.dataframe(pd.DataFrame([{
                "id": d.id, "label": d.label_name, "graph says": d.suggested_name,
                "score": d.score, "source": d.source, "annotator": d.annotator, "reason": d.reason,
            } for d in found]), hide_index=True, width="stretch",
                height=320 if len(found) > 8 else "auto",  # no empty rows under a short list
                column_config={"score": st.column_config.NumberColumn(format="%.2f")})
            st.caption("Human labels whose graph neighbours point strongly elsewhere: worth a second "
                       "look.")
            pick = st.selectbox("Look at one again", [d.id for d in found], key="doubt_pick",
                                help="opens it first on the Label page, beside labeled examples "
                                     "of its label and of the class the graph says; label it "
                                     "again there to change it")
            if st.button("Open it on the Label page", key="doubt_open",
                         icon=":material/open_in_new:"):
                st.session_state[state.OPENED_SAMPLE] = pick
                st.switch_page("views/label.py")

with st.expander("Graph views: what the propagation ran on", expanded=True):
    _views_section()

with st.expander("Propagation details"):
    info = {
        "round": live.round,
        "reliable propagated labels": int(np.sum(res.reliable & (live.human < 0))),
        "views in the graph (weight)": {v: round(float(w), 3) for v, w in live.weights.items()},
        "CG iterations": res.solve.iterations,
        "converged": bool(res.solve.converged),
    }
    st.json(info)
