"""Label page: the suggestion queue. One suggested sample at a time, animated, beside static
pictures of labeled examples of its guess, its runner-up and its nearest class; label it with a
click or a number key (``state.label_keys``), skip it, or undo. Every label re-propagates at once
(no retraining) and the next suggestion appears. Before the first round: typical samples for the
first labels (``Annotator.first_labels``), with the same controls.

Speed: the panel is a fragment (a label reruns it, not the page), the id and buttons are sent
before the plot, only the current sample is a 3D (WebGL) plot, and while the person looks at a
sample the figures of what comes next (after a skip, and after labeling it as the guess) are
built in a worker thread. tests/e2e/test_latency.py measures it."""

from __future__ import annotations

import hashlib
import html

import numpy as np
import streamlit as st

import state
from speler.errors import SpelerError
from speler.selection import Suggestion

annotator = state.current_annotator()
project = annotator.project  # display only: data and store lookups
NAME = annotator.name
OPENED = state.OPENED_SAMPLE


def _set_person() -> None:
    state.set_person(st.session_state.get("annotator_input", ""))


def _do_label(sample_id: str, class_name: str, seen: int) -> None:
    """``seen``: the sample's human label when the page showed it (-1: none): if someone else
    labeled it since (another tab, the command line), nothing is saved and the page says so."""
    try:
        state.open_annotator(NAME).label(sample_id, class_name, annotator=state.person(), seen=seen)
    except SpelerError as exc:  # an opened sample stays open: the message asks to look again
        state.flash("error", f"{exc}")
        return
    _close(sample_id)
    state.flash("toast", f"{sample_id} → {class_name}")


def _do_other(sample_id: str, seen: int) -> None:
    choice = st.session_state.get("other_class")
    st.session_state["other_class"] = None
    if choice:
        _do_label(sample_id, choice, seen)


def _skipped() -> set[str]:
    return state.skipped(state.open_annotator(NAME), state.person())


def _do_open() -> None:
    """Show the sample whose id was typed first (any sample, labeled ones too: e.g. a label
    doubt from the Diagnostics page), until it is labeled or skipped."""
    sample_id = st.session_state.get("open_id", "").strip()
    st.session_state["open_id"] = ""
    if not sample_id:
        return
    try:
        project.store.sample_index(sample_id)
    except SpelerError as exc:
        state.flash("error", f"{exc}")
        return
    st.session_state[OPENED] = sample_id
    _skipped().discard(sample_id)


def _close(sample_id: str) -> None:
    if st.session_state.get(OPENED) == sample_id:
        del st.session_state[OPENED]


def _do_skip(sample_id: str) -> None:
    _close(sample_id)
    _skipped().add(sample_id)
    front = st.session_state.get("front", [])
    if sample_id in front:
        front.remove(sample_id)


def _do_unskip() -> None:
    _skipped().clear()


def _do_undo() -> None:
    try:
        undone, _ = state.open_annotator(NAME).undo(annotator=state.person())
    except SpelerError as exc:
        state.flash("error", f"{exc}")
        return
    if undone is None:
        state.flash("toast", "Nothing to undo: you have not labeled anything yet.")
        return
    now = f"{undone.restored} ({undone.restored_source})" if undone.restored else "no label"
    state.flash("toast", f"Undid {undone.sample_id} → {undone.label}; it now has {now}.")
    front = st.session_state.setdefault("front", [])
    if undone.sample_id not in front:
        front.insert(0, undone.sample_id)  # show it again first
    _skipped().discard(undone.sample_id)


def _ink(color: str) -> str:
    """Black or white text, whichever reads better on ``color`` (#RRGGBB)."""
    r, g, b = (int(color.lstrip("#")[k:k + 2], 16) / 255 for k in (0, 2, 4))
    return "#111111" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.6 else "#FFFFFF"


def _chip(name: str, color: str, *, small: bool = False) -> str:
    size = "0.85em" if small else "1.05em"
    return (f"<span style='background:{color};color:{_ink(color)};padding:1px 8px;"
            f"border-radius:10px;font-size:{size};font-weight:600'>{html.escape(name)}</span>")


def _button_key(k: int, sample_id: str) -> str:
    """The widget key of label button ``k`` (1-based) for ``sample_id``. The sample is part of
    it: a click (or key press) sent while the browser still showed the previous sample names
    that sample's button, which the next run no longer has, so Streamlit drops it instead of
    labeling the sample that replaced it, unseen, with the same class."""
    return f"label_{k}_{hashlib.sha1(sample_id.encode()).hexdigest()[:10]}"


def _button_css(names: list[str], colors: dict[str, str], guess: str | None,
                sample_id: str) -> str:
    """Class colours on the label buttons: a stripe on each, the guess's button filled (its text
    in the colour that reads on it, hovered too)."""
    rules = [f".st-key-{_button_key(k + 1, sample_id)} button "
             f"{{border-left: 7px solid {colors[n]};}}" for k, n in enumerate(names)]
    if guess in names:
        key = f".st-key-{_button_key(names.index(guess) + 1, sample_id)} button"
        c = colors[guess]
        ink = _ink(c)
        rules.append(f"{key}, {key}:hover, {key}:focus {{background: {c}; border-color: {c}; "
                     f"color: {ink};}} {key}:hover {{filter: brightness(0.92);}}"
                     f"{key} p, {key} span, {key}:hover p, {key}:hover span {{color: {ink};}}")
    return "<style>" + "".join(rules) + "</style>"


def _queue(state_, classes: tuple[str, ...]) -> list:
    """Suggestions, with samples to show again (after an undo) in front."""
    cfg = annotator.config.selection
    queue = state.suggestions(annotator, state_, n=cfg.batch, strategy=cfg.strategy,
                              skipped=_skipped())
    human = state_.human
    front = [i for i in st.session_state.get("front", [])
             if human[project.store.sample_index(i)] < 0]
    st.session_state["front"] = front
    reasons = st.session_state.get("reasons", {})
    extra = [annotator.suggestion_for(sid, reason=reasons.get(sid, "you undid its label"))
             for sid in front]
    opened = st.session_state.get(OPENED)
    try:
        i = -1 if opened is None else project.store.sample_index(opened)
    except SpelerError:  # the project's data changed since
        del st.session_state[OPENED]
        opened = None
    if opened is not None:
        had = (f"labeled {classes[int(human[i])]} by people; label it again to change that, or "
               f"skip it" if human[i] >= 0 else "not labeled by people yet")
        extra = [annotator.suggestion_for(opened, reason=f"you opened it: {had}")] + [
            s for s in extra if s.id != opened]
    if not extra:
        return queue
    shown = {s.id for s in extra}
    return extra + [s for s in queue if s.id not in shown]


def _main_figure(index: int, pred: str | None, colors: dict[str, str]):
    """The suggested sample's figure: animated 3D skeleton or series lines (cached per sample)."""
    return state.sample_figure(annotator, index, title="", height=430,
                               color=colors.get(pred, "#444444") if pred else "#444444")


def _controls(sample_id: str, seen: int, classes: tuple[str, ...], order, colors: dict[str, str],
              guess: str | None, skipped: set[str]) -> None:
    """The label buttons (``state.label_keys``; the guess filled), the search box for classes
    without a key, skip, undo, the skipped samples' recall and the annotator's name."""
    keyed, keys = state.label_keys(classes, order)
    st.html(_button_css(keyed, colors, guess, sample_id))
    grid = st.columns(3)
    for k, name in enumerate(keyed):
        grid[k % 3].button(
            name, key=_button_key(k + 1, sample_id), shortcut=keys[k], width="stretch",
            on_click=_do_label, args=(sample_id, name, seen),
            help=f"label {sample_id} as {name}" + (" (the guess)" if name == guess else ""),
        )
    if len(keyed) < len(classes):  # picked, then confirmed: Enter in the search box picks its
        # first match, and a label must not follow from that alone
        rest = [c for c in (classes[k] for k in order) if c not in keyed]
        pick, go = st.columns([3, 1], vertical_alignment="bottom")
        choice = pick.selectbox("Another class", rest, index=None, key="other_class",
                                placeholder=f"Search the other {len(rest)} classes…")
        go.button("Label", key=f"other_go_{_button_key(0, sample_id)}", disabled=choice is None,
                  width="stretch",
                  on_click=_do_other, args=(sample_id, seen),
                  help=f"label {sample_id} as the class picked beside")
    a, b = st.columns(2)
    a.button("Skip", key="skip", shortcut="S", width="stretch", on_click=_do_skip,
             args=(sample_id,), icon=":material/skip_next:")
    b.button("Undo last label", key="undo", shortcut="U", width="stretch", on_click=_do_undo,
             icon=":material/undo:")
    _unskip_button(st, skipped, type="tertiary", icon=":material/replay:")
    with st.expander("Annotator: " + (state.person() or "not set")):
        st.text_input("Your name", key="annotator_input", value=state.person(),
                      on_change=_set_person, help="saved with every label you give")


def _unskip_button(where, skipped: set[str], **style) -> None:
    """The button that shows the skipped samples again (none when nothing is skipped)."""
    if skipped:
        where.button(f"Show the {len(skipped)} skipped samples again", key="unskip",
                     on_click=_do_unskip, **style)


def _keys_caption(classes: tuple[str, ...], order, *, guessed: bool = True) -> str:
    """How the number keys work on this sample (``guessed``: ``order`` is by likelihood)."""
    keyed, keys = state.label_keys(classes, order)
    how = ("each class keeps its key" if len(keyed) == len(classes)
           else "1 = the guess, then the next most likely" if guessed
           else "the first nine classes; the search box has the rest")
    return f"keys {keys[0]}–{keys[-1]} label ({how}), S skips, U undoes your last label"


def _open_box() -> None:
    st.text_input("Open a sample by id", key="open_id", on_change=_do_open,
                  placeholder="e.g. an id from the label doubts on the Diagnostics page",
                  help="shows that sample first, labeled or not, until you label or skip it")


@st.fragment
def _panel(classes: tuple[str, ...], colors: dict[str, str]) -> None:
    """Everything a label changes. A fragment: a label, skip or undo reruns only this, not the
    page; the sample's id and buttons are sent before its plot, and neighbours are light
    static pictures, so the next sample shows at once and its animation follows."""
    state.show_flash()
    with state.user_error("Run a new round on the Round page if the project changed."):
        live = annotator.state()
    with state.user_error("Check the suggestion settings on the Round page."):
        queue = _queue(live, classes)
    ds = project.data
    human_n = int((live.human >= 0).sum())
    skipped = _skipped()
    if not queue:
        if skipped:
            st.success(f"Nothing left to suggest but the {len(skipped)} samples you skipped. "
                       "Show them again, export the labels, or run another round.")
        else:
            st.success(f"Nothing left to suggest: all {ds.n} samples have a human label. Export "
                       "the labels, or run another round.")
        a, b = st.columns(2)
        a.button("Undo last label", key="undo", on_click=_do_undo, shortcut="U")
        _unskip_button(b, skipped)
        _open_box()
        return

    sug = queue[0]
    i = int(sug.index)
    seen = int(live.human[i])  # its human label as shown: a label click checks it is still so
    st.session_state.setdefault("reasons", {})[sug.id] = sug.reason  # kept for a later undo
    scores = np.asarray(live.result.scores[i], dtype=np.float64)
    # the guess and the runner-up shown (for a labeled sample its neighbours', for one no label
    # reaches the prior's) first, then the other classes by score: key 1 is the guess shown
    shown = [c for c in (sug.predicted, sug.runner_up) if c >= 0]
    order = np.array(shown + [int(c) for c in np.argsort(-scores, kind="stable")
                              if c not in shown], dtype=np.int64)
    pred = classes[sug.predicted] if sug.predicted >= 0 else None
    runner = classes[sug.runner_up] if sug.runner_up >= 0 else None

    st.caption(f"Project **{NAME}** · round {live.round} · {human_n:,} of {ds.n:,} samples labeled "
               f"by people · {len(queue)} suggestions, chosen again after every label"
               + (f" · {len(skipped)} skipped" if skipped else "")
               + f" · {_keys_caption(classes, order)}")
    left, right = st.columns([3, 2], gap="medium")

    with right:  # first: the id and the buttons reach the browser before the plot
        with st.container(key="current_sample"):
            st.markdown(f"#### {html.escape(sug.id)}")
        if pred:
            runner_txt = f" · runner-up {_chip(runner, colors[runner], small=True)}" if runner else ""
            st.markdown(f"Propagated guess {_chip(pred, colors[pred])}{runner_txt}",
                        unsafe_allow_html=True)
        m1, m2 = st.columns(2)
        m1.metric("Energy", f"{sug.energy:.2f}",
                  help="how well the sample is connected to the labeled ones: lower (more "
                       "negative) = better connected, 0 = reached by no label")
        m2.metric("Margin", f"{sug.margin:.3f}", help="gap between the two best classes; small = boundary")
        st.caption(f"Why: {sug.reason}")

        _controls(sug.id, seen, classes, order, colors, pred, skipped)
        _open_box()

    with left:
        st.plotly_chart(_main_figure(i, pred, colors), key="main_plot",
                        config={"displaylogo": False})

    st.markdown("##### Nearest labeled neighbours")
    nbrs = annotator.neighbours(i, k=3, first_of=_candidates(sug))
    if not nbrs:
        st.caption("No labeled samples yet.")
    elif not ds.layout.is_series:
        st.caption("The nearest labeled example of the guess and of the runner-up, then the "
                   "nearest of any class; each in four moments of its motion, left to right, seen "
                   "from the front.")
    else:
        st.caption("The nearest labeled example of the guess and of the runner-up, then the "
                   "nearest of any class.")
    cols = st.columns(3)
    for col, j in zip(cols, nbrs):
        lab = classes[int(live.human[j])]
        with col:
            st.markdown(f"{_chip(lab, colors[lab], small=True)} &nbsp; `{ds.ids[j]}`",
                        unsafe_allow_html=True)
            with st.container(key=f"nbr_{j}"):  # st.html drops <svg>; markdown keeps it
                st.markdown(f"<div>{state.thumbnail(annotator, j, color=colors[lab])}</div>",
                            unsafe_allow_html=True)

    # Build now what the next key press will show, while the person looks at this sample: the
    # sample after a skip (the queue's next), and the first suggestion after labeling this one as
    # the guess (key 1), which the Annotator works out in memory without writing it.
    state.prefetch(lambda: _warm(live, queue[1:2], classes, colors),
                   lambda: _warm_after_label(live, sug, skipped, classes, colors))


@st.fragment
def _first_panel(classes: tuple[str, ...], colors: dict[str, str]) -> None:
    """Before any round (no graph, no guess): typical samples of the data's main groups to give
    the first labels with (``Annotator.first_labels``); the same keys, skip and undo."""
    state.show_flash()
    ds = project.data
    skipped = _skipped()
    with state.user_error("Check the project's data on the Project page."):
        with st.spinner("Describing the samples for the first labels…"):
            queue = annotator.first_labels(exclude=tuple(skipped))
    human = project.store.human_labels()
    counts = np.bincount(human[human >= 0], minlength=len(classes))
    st.caption(f"Project **{NAME}** · no round yet · {int(counts.sum()):,} of {ds.n:,} samples "
               f"labeled by people · {int((counts > 0).sum())} of {len(classes)} classes have a "
               f"label" + (f" · {len(skipped)} skipped" if skipped else "")
               + f" · {_keys_caption(classes, np.arange(len(classes)), guessed=False)}")
    if (counts > 0).all():
        st.info("Every class has a label: run round 0 for suggestions. Until then these are "
                "typical samples of the data's main groups, largest first.",
                icon=":material/flag:")
    else:
        st.info("There is no round yet, so nothing to suggest from: these are typical samples of "
                "the data's main groups, largest first. Give a label to a few samples of every "
                "class you recognise, then run round 0: its suggestions start from your labels.",
                icon=":material/flag:")
    if counts.sum():
        st.page_link("views/round.py", label="Run round 0 on the Round page",
                     icon=":material/model_training:")
    if not queue:
        st.success("Nothing left to show here" + (f" but the {len(skipped)} samples you skipped"
                                                   if skipped else "") + ": run round 0.")
        _unskip_button(st, skipped)
        return
    sug = queue[0]
    left, right = st.columns([3, 2], gap="medium")
    with right:
        with st.container(key="current_sample"):
            st.markdown(f"#### {html.escape(sug.id)}")
        st.caption(f"Why: {sug.reason}")
        _controls(sug.id, -1, classes, np.arange(len(classes)), colors, None, skipped)
    with left:
        st.plotly_chart(_main_figure(int(sug.index), None, colors), key="main_plot",
                        config={"displaylogo": False})


def _candidates(s: Suggestion) -> tuple[int, ...]:
    """The guess and the runner-up of a suggestion (the classes it is shown beside)."""
    return tuple(c for c in (s.predicted, s.runner_up) if c >= 0)


def _warm(live, suggestions: list, classes: tuple[str, ...], colors: dict[str, str]) -> None:
    """Build (into the caches) the figures of ``suggestions`` and of their labeled neighbours."""
    for s in suggestions:
        _main_figure(int(s.index), classes[s.predicted] if s.predicted >= 0 else None, colors)
        for j in annotator.neighbours(int(s.index), k=3, first_of=_candidates(s)):
            state.thumbnail(annotator, j, color=colors[classes[int(live.human[j])]])


def _warm_after_label(live, sug: Suggestion, skipped: set[str], classes: tuple[str, ...],
                      colors: dict[str, str]) -> None:
    if sug.predicted < 0:
        return
    guess = classes[sug.predicted]
    cfg = annotator.config.selection
    after = annotator.suggest_after(sug.id, guess, n=cfg.batch, strategy=cfg.strategy,
                                    exclude=tuple(skipped))[:1]  # the queue's first, as it will be
    # once labeled, this sample is a neighbour candidate too: its picture, in the guess's colour
    state.thumbnail(annotator, int(sug.index), color=colors[guess])
    _warm(live, after, classes, colors)


st.title("Label")
with state.user_error("Run a new round on the Round page if the project changed."):
    classes = annotator.data.classes
    live = annotator.state()
job = state.round_job(annotator)
if job is not None and job.running:
    st.info("A round is running; you can keep labeling. Its results replace these suggestions when "
            "it finishes.", icon=":material/hourglass_top:")
if live is None:
    _first_panel(classes, state.class_colors(classes))
    st.stop()
_panel(classes, state.class_colors(classes))
