"""Replay of one layer's decision trace (engine.gkp.traces) as a sequence of steps a person can walk
through: each step is one decision (a snaking deal, a clustering, a ticket's vote, a beam cut,
a greedy addition, a restart table, a final choice; an in-train pruning epoch of the layer's mask,
its freeze; AdaSAP's radii, pruning steps and sharpness) rendered as a plain `Frame` for the
stepper widget. Sets are shown sorted with the new member marked, identical sets are flagged,
ranks have a legend and every tie names the rule that broke it; in-train pruning's steps carry a
mask-evolution table: which entries turned off in which epoch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.gkp.traces import (
    BeamCut,
    BeamFinal,
    Clustering,
    FinalChoice,
    LayerDone,
    LayerSkipped,
    LayerStart,
    MaskEpoch,
    MaskFreeze,
    MaskSetup,
    ProgressivePrune,
    RandomGrouping,
    RankedSelection,
    RhoEpoch,
    SharpnessMeasured,
    SnakeDeal,
    StartResults,
    TmiTicket,
    TmiVote,
    TraceEvent,
)
from widgets.stepper import Frame, Groups, Kept, StepTable

# What a step shows: stage, title, notes, detail table, filter groups, the group in focus.
Described = tuple[str, str, tuple[str, ...], StepTable | None, Groups | None, int | None]
SNAKE_WINDOW = 6  # ranks shown either side of the one being dealt
TOP_ROWS = 12  # rows of a restart or ranking table before "… more"
MEMBERS_SHOWN = 10
RANK_LEGEND = "R(·) = rank among candidates, 0 = best (highest cost, smoothest); equal values share a rank"
MASK_ROWS = 64  # rows of the mask-evolution table
EPOCH_MARKS = "123456789abcdefghijklmnopqrstuvwxyz"  # the epoch an entry turned off; "+" later
FROZEN_MARK, ON_MARK = "*", "·"


@dataclass(frozen=True)
class Step:
    """One replay step: event `event`, sub-step `sub` (the rank of a snaking deal, else 0), and
    the groups and kept channels established once it is done."""

    event: TraceEvent
    sub: int
    decision: bool
    groups: Groups | None
    kept: Kept | None
    table: StepTable | None = None


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _members(members: Sequence[int]) -> str:
    shown = " ".join(str(m) for m in members[:MEMBERS_SHOWN])
    return shown + (f" …(+{len(members) - MEMBERS_SHOWN})" if len(members) > MEMBERS_SHOWN else "")


def _sorted_groups(groups: Iterable[Iterable[int]]) -> Groups:
    return tuple(tuple(sorted(g)) for g in groups)


def _marked(members: Iterable[int], new: int) -> str:
    """Members sorted, the one just added marked `+`; a long set shows the MEMBERS_SHOWN around
    the new one."""
    ordered = sorted(members)
    at = ordered.index(new) if new in ordered else 0
    low = min(max(0, at - MEMBERS_SHOWN // 2), max(0, len(ordered) - MEMBERS_SHOWN))
    shown = ordered[low: low + MEMBERS_SHOWN]
    text = " ".join(f"+{m}" if m == new else str(m) for m in shown)
    before, after = low, len(ordered) - low - len(shown)
    return (f"({before} more)… " if before else "") + text + (f" …({after} more)" if after else "")


def same_set_notes(sets: Sequence[Iterable[int]]) -> list[str]:
    """Per set, "= #k" when an earlier one (numbered from 0) holds the same members, perhaps added
    in another order, else ""."""
    first: dict[frozenset[int], int] = {}
    notes = []
    for i, members in enumerate(sets):
        key = frozenset(members)
        notes.append(f"= #{first[key]}" if key in first else "")
        first.setdefault(key, i)
    return notes


def tie_note(names: Sequence[str], values: Sequence[float], best: float, rule: str) -> str | None:
    """"tie at V between a and b: <rule>" when more than one name has the best value."""
    tied = [n for n, v in zip(names, values) if v == best]
    return f"tie at {_fmt(best)} between {', '.join(tied)}: {rule}" if len(tied) > 1 else None


def greedy_winner(e: StartResults) -> int:
    """Index of the start whose set wins: the highest score, the lowest start on ties."""
    return min(range(len(e.starts)), key=lambda i: (-e.scores[i], i))


def _epoch_mark(epoch: int) -> str:
    return EPOCH_MARKS[epoch - 1] if 1 <= epoch <= len(EPOCH_MARKS) else "+"


class MaskHistory:
    """When each entry of an in-train pruning mask turned off (the epoch, or the freeze), as the
    replay goes; rendered as one text row per filter group, filter or (channel masks) one row."""

    def __init__(self, setup: MaskSetup) -> None:
        self.setup = setup
        self.off: dict[int, str] = {}

    def apply(self, turned_off: Sequence[int], turned_on: Sequence[int], mark: str) -> None:
        for index in turned_off:
            self.off[index] = mark
        for index in turned_on:
            self.off.pop(index, None)

    @property
    def per_cell(self) -> int:
        """Mask entries per displayed cell (k×k for weight masks, whose cells are kernels)."""
        shape = self.setup.mask_shape
        return shape[2] * shape[3] if self.setup.granularity == "weight" else 1

    def table(self, changed: set[int]) -> StepTable:
        shape = self.setup.mask_shape
        rows_n, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
        cell = self.per_cell
        rows, marks = [], []
        for r in range(min(rows_n, MASK_ROWS)):
            chars = []
            for c in range(cols):
                start = (r * cols + c) * cell
                marked = [self.off[i] for i in range(start, start + cell) if i in self.off]
                if not marked:
                    chars.append(ON_MARK)
                elif cell == 1:
                    chars.append(marked[0])
                else:
                    chars.append("#" if len(marked) == cell else str(min(9, 10 * len(marked) // cell)))
            hit = any((r * cols + c) * cell + k in changed for c in range(cols) for k in range(cell))
            label = {"grouped-kernel": f"G{r}", "channel": "in"}.get(self.setup.granularity, f"f{r}")
            rows.append((label, "".join(chars)))
            marks.append("current" if hit else "")
        return StepTable(("row", "inputs: · on, 1-9a-z epoch turned off, * at freeze"), tuple(rows), tuple(marks))

    def kept(self) -> Kept:
        """Grouped-kernel masks: the input channels each group still keeps."""
        groups, width = self.setup.mask_shape
        return tuple(tuple(c for c in range(width) if g * width + c not in self.off) for g in range(groups))


class LayerReplay:
    """The steps of one layer's trace and the state each leaves behind."""

    def __init__(self, events: Sequence[TraceEvent]) -> None:
        if not events:
            raise ValueError("a replay needs at least one trace event")
        self.layer = next((e.layer for e in events if e.layer), events[0].layer)
        start = next((e for e in events if isinstance(e, LayerStart)), None)
        self.in_channels = start.in_channels if start else 0
        self.groups_count = start.groups if start else 0
        # A forced clustering (`cluster:<scheme>`) is the grouping; under TMI it is a candidate.
        forced_clustering = start is not None and start.grouping.startswith("cluster:")
        self.steps: list[Step] = []
        self._clusterings: dict[str, Groups] = {}
        groups: Groups | None = None
        kept: Kept | None = (None,) * self.groups_count if self.groups_count else None
        history: MaskHistory | None = None
        for event in events:
            if isinstance(event, MaskSetup):
                history = MaskHistory(event)
                self.in_channels = event.mask_shape[0] if len(event.mask_shape) == 1 else event.mask_shape[1]
                if event.filter_groups:
                    groups = _sorted_groups(event.filter_groups)
                    kept = history.kept()
                self.steps.append(Step(event, 0, False, groups, kept, history.table(set())))
                continue
            if isinstance(event, (MaskEpoch, MaskFreeze)) and history is not None:
                mark = FROZEN_MARK if isinstance(event, MaskFreeze) else _epoch_mark(event.epoch)
                history.apply(event.turned_off, event.turned_on, mark)
                if history.setup.filter_groups:
                    kept = history.kept()
                changed = set(event.turned_off) | set(event.turned_on)
                self.steps.append(Step(event, 0, bool(changed) or isinstance(event, MaskFreeze), groups, kept,
                                       history.table(changed)))
                continue
            if isinstance(event, SnakeDeal):
                dealt: list[list[int]] = [[] for _ in range(max(event.groups) + 1)]
                for filt, group in zip(event.filters, event.groups):
                    dealt[group].append(filt)
                last = len(event.filters) - 1
                for rank in range(last):
                    self.steps.append(Step(event, rank, False, groups, kept))
                groups = _sorted_groups(dealt)
                self.steps.append(Step(event, last, True, groups, kept))
                continue
            if isinstance(event, StartResults) and event.selection == "greedy" and event.starts:
                for addition in range(len(event.members[greedy_winner(event)])):
                    self.steps.append(Step(event, addition, False, groups, kept))
                self.steps.append(Step(event, len(event.members[greedy_winner(event)]), True, groups, kept))
                continue
            if isinstance(event, RandomGrouping):
                groups = _sorted_groups(event.filter_groups)
            elif isinstance(event, Clustering):
                self._clusterings[event.scheme] = _sorted_groups(event.filter_groups)
                if forced_clustering:
                    groups = self._clusterings[event.scheme]
            elif isinstance(event, TmiVote):
                groups = self._clusterings.get(event.winner, groups)
            elif isinstance(event, FinalChoice) and kept is not None and event.group < len(kept):
                kept = kept[: event.group] + (tuple(sorted(event.kept)),) + kept[event.group + 1:]
            candidate = isinstance(event, Clustering) and not forced_clustering
            decision = not (candidate or isinstance(event, (LayerStart, BeamFinal, TmiTicket, RhoEpoch)))
            self.steps.append(Step(event, 0, decision, groups, kept, None if history is None else history.table(set())))

    @property
    def final_groups(self) -> Groups | None:
        return self.steps[-1].groups

    @property
    def final_kept(self) -> Kept | None:
        return self.steps[-1].kept

    def next_decision(self, position: int) -> int:
        """Position of the next decision step after `position` (the last step if none)."""
        for i in range(position + 1, len(self.steps)):
            if self.steps[i].decision:
                return i
        return len(self.steps) - 1

    def previous_decision(self, position: int) -> int:
        """Position of the previous decision step before `position` (the first step if none)."""
        for i in range(position - 1, -1, -1):
            if self.steps[i].decision:
                return i
        return 0

    def first_of(self, kind: str) -> int | None:
        """Position of the first step of event kind `kind`, if any."""
        return next((i for i, s in enumerate(self.steps) if s.event.kind == kind), None)

    def frame(self, position: int) -> Frame:
        """The frame shown at `position` (clamped to the replay)."""
        position = min(max(position, 0), len(self.steps) - 1)
        step = self.steps[position]
        stage, title, notes, table, groups, focus = self._describe(step)
        table = step.table if step.table is not None else table
        return Frame(
            layer=self.layer, position=position, total=len(self.steps), stage=stage, title=title,
            notes=notes, table=table, groups=groups, kept=step.kept, in_channels=self.in_channels,
            focus_group=focus,
        )

    def _describe(self, step: Step) -> Described:
        e = step.event
        if isinstance(e, LayerStart):
            per_group = e.out_channels // e.groups if e.groups else 0
            return (
                "layer", f"{e.layer}: {e.out_channels}×{e.in_channels}×{e.kernel_size[0]}×{e.kernel_size[1]}",
                (
                    f"{e.groups} filter groups of {per_group} filters; each keeps S={e.kept} of "
                    f"{e.in_channels} grouped kernels",
                    f"grouping {e.grouping}, selection {e.selection}, compat {e.compat}",
                ),
                None, step.groups, None,
            )
        if isinstance(e, LayerSkipped):
            return "skipped", f"{e.layer} is left dense", (e.reason,), None, None, None
        if isinstance(e, SnakeDeal):
            return self._snake(e, step.sub)
        if isinstance(e, RandomGrouping):
            return "grouping", "Random equal-size filter groups (seeded)", (), None, step.groups, None
        if isinstance(e, Clustering):
            notes = () if e.eps is None else (f"DBSCAN eps {e.eps:.4g} gave {e.raw_clusters} clusters before balancing",)
            return (
                "TMI clustering", f"Scheme {e.scheme}: {len(e.filter_groups)} equal-size groups",
                notes, None, self._clusterings.get(e.scheme), None,
            )
        if isinstance(e, TmiTicket):
            return self._ticket(e)
        if isinstance(e, TmiVote):
            return self._vote(e, step.groups)
        if isinstance(e, BeamCut):
            return self._cut(e, step.groups)
        if isinstance(e, BeamFinal):
            return self._beam_final(e, step.groups)
        if isinstance(e, StartResults) and e.selection == "greedy" and step.sub < len(e.members[greedy_winner(e)]):
            return self._greedy_addition(e, step.sub, step.groups)
        if isinstance(e, StartResults):
            return self._restarts(e, step.groups)
        if isinstance(e, RankedSelection):
            return self._ranked(e, step.groups)
        if isinstance(e, FinalChoice):
            extra = () if e.score is None else (f"winning start {e.start}, score {_fmt(e.score)}",)
            return (
                "final choice", f"Group {e.group} keeps {len(e.kept)} grouped kernels: {_members(e.kept)}",
                extra, None, step.groups, e.group,
            )
        if isinstance(e, (MaskSetup, MaskEpoch, MaskFreeze)):
            return self._mask(e, step.groups)
        if isinstance(e, RhoEpoch):
            return self._rho(e)
        if isinstance(e, SharpnessMeasured):
            return (
                "sharpness", f"Sharpness {e.when.replace('_', ' ')}: {_fmt(e.value)}",
                (f"max L(w+ε) − L(w) over ‖ε‖₂ ≤ {_fmt(e.rho)} by {e.steps} ascent steps on {e.images} training "
                 f"images; L(w) = {_fmt(e.loss)}",), None, step.groups, None,
            )
        if isinstance(e, ProgressivePrune):
            return (
                "AdaSAP pruning",
                f"Step {e.step}/{e.steps} at iteration {e.iteration}: {e.method} re-plans at rate {e.rate:.4f}",
                (f"{e.zeroed} weights zeroed and kept at zero; the last step's plan is the result",),
                None, step.groups, None,
            )
        if isinstance(e, LayerDone):
            return (
                "layer done",
                f"{e.layer} done: {e.grouping} + {e.selection}, {e.achieved_ratio:.2%} of kernels pruned",
                (f"layer score {_fmt(e.score)}",), None, step.groups, None,
            )
        return e.kind, e.kind, (), None, step.groups, None

    def _mask(self, e: MaskSetup | MaskEpoch | MaskFreeze, groups: Groups | None) -> Described:
        if isinstance(e, MaskSetup):
            shape = "×".join(str(d) for d in e.mask_shape)
            notes = [f"dense cost {e.cost:,} {e.measure}; starts all on (M = 1)"]
            if e.reader:
                notes.append(f"its outputs feed {e.reader}'s inputs directly: channel pruning there shrinks it too")
            if e.filter_groups:
                notes.append(f"filter groups fixed by {e.grouping}")
            return "ITP mask", f"{e.layer}: {e.granularity} mask {shape}", tuple(notes), None, groups, None
        share = e.on / e.total if e.total else 0.0
        changes = f"{len(e.turned_off)} entries turned off, {len(e.turned_on)} on"
        if isinstance(e, MaskFreeze):
            per_group = "" if e.kept_per_group is None else f", S = {e.kept_per_group} per group"
            return (
                "ITP freeze", f"Masks freeze after epoch {e.epoch}: {e.on}/{e.total} on ({share:.1%}){per_group}",
                (f"model complexity learned {e.learned_complexity:.4f} → {e.model_complexity:.4f}, target {e.target:.4f}",
                 f"the freeze (equal counts, completion to the target) changed: {changes}"),
                None, groups, None,
            )
        val = "" if e.val_benign is None else f", validation {e.val_benign:.1%}"
        return (
            f"ITP {e.phase}", f"Epoch {e.epoch}: {e.on}/{e.total} entries on ({share:.1%}){val}",
            (f"L_HW {_fmt(e.hw_loss)}; model complexity {e.model_complexity:.4f} (target {e.target:.4f}); "
             f"this layer {e.layer_complexity:.4f}", changes),
            None, groups, None,
        )

    def _rho(self, e: RhoEpoch) -> Described:
        order = sorted(range(len(e.importance_last)), key=lambda i: (e.importance_last[i], i))[:TOP_ROWS]
        rows = tuple((str(i), _fmt(e.importance_last[i]), _fmt(e.rho_last[i]), _fmt(e.rho_mean[i])) for i in order)
        marks = tuple("win" if i == e.least_important else "" for i in order)
        return (
            "AdaSAP ρ",
            f"{e.phase.capitalize()} epoch {e.epoch}: ρ {_fmt(e.rho_low)}–{_fmt(e.rho_high)} over {e.steps} steps",
            (f"least important filter {e.least_important} had ρ_max at the last step; least important first",),
            StepTable(("filter", "importance", "ρ last", "ρ mean"), rows, marks), None, None,
        )

    def _snake(self, e: SnakeDeal, rank: int) -> Described:
        dealt: list[list[int]] = [[] for _ in range(max(e.groups) + 1)]
        for filt, group in zip(e.filters[: rank + 1], e.groups[: rank + 1]):
            dealt[group].append(filt)
        order = "descending" if e.descending else "ascending"
        low, high = max(0, rank - SNAKE_WINDOW), min(len(e.filters), rank + SNAKE_WINDOW + 1)
        rows = tuple((str(r), str(e.filters[r]), _fmt(e.values[r]), f"G{e.groups[r]}") for r in range(low, high))
        marks = tuple("current" if r == rank else ("pending" if r > rank else "") for r in range(low, high))
        return (
            "snaking",
            f"Rank {rank}: filter {e.filters[rank]} ({e.key} {_fmt(e.values[rank])}) → group {e.groups[rank]}",
            (f"filters sorted by {e.key}, {order}; dealt in S order: 0..n-1, then n-1..0",),
            StepTable(("rank", "filter", e.key, "group"), rows, marks),
            _sorted_groups(dealt), e.groups[rank],
        )

    def _ticket(self, e: TmiTicket) -> Described:
        rows = tuple(
            (
                scheme, " ".join(_fmt(g) for g in e.gaps[i][:4]) + (" …" if len(e.gaps[i]) > 4 else ""),
                _fmt(e.gap_mean[i]), _fmt(e.gap_var[i]), _fmt(e.rank_mean[i]), _fmt(e.rank_var[i]),
                _fmt(e.score[i]),
            )
            for i, scheme in enumerate(e.schemes)
        )
        marks = tuple("win" if s == e.winner else "" for s in e.schemes)
        tie = tie_note(e.schemes, e.score, min(e.score), f"the earlier scheme, {e.winner}, wins")
        return (
            "TMI ticket", f"Ticket epoch {e.epoch} votes for {e.winner}",
            ("score = R(mean) + α·R(var) over the sorted group-score gaps; lowest wins",
             "R(·) = rank among the schemes, 0 = smallest", *([tie] if tie else [])),
            StepTable(("scheme", "gaps", "mean", "var", "R(mean)", "R(var)", "score"), rows, marks),
            self._clusterings.get(e.winner), None,
        )

    def _vote(self, e: TmiVote, groups: Groups | None) -> Described:
        rows = tuple((s, str(e.tally[i]), str(e.longest_run[i])) for i, s in enumerate(e.schemes))
        marks = tuple("win" if s == e.winner else "" for s in e.schemes)
        votes = " ".join(f"{epoch}:{vote}" for epoch, vote in zip(e.epochs, e.votes))
        most = max(e.tally)
        tied = [i for i, t in enumerate(e.tally) if t == most]
        if len(tied) > 1:
            runs = [e.longest_run[i] for i in tied]
            rule = ("the longest run of consecutive wins decides" if runs.count(max(runs)) == 1
                    else "equal longest runs too, so the earliest scheme wins")
            decided = f"tie at {most} votes between {', '.join(e.schemes[i] for i in tied)}: {rule} ({e.winner})"
        else:
            decided = "ties would go to the longest run of consecutive wins, then the earliest scheme"
        return (
            "TMI vote", f"{e.winner} wins the vote of {len(e.epochs)} tickets",
            (f"votes {votes}", decided),
            StepTable(("scheme", "votes", "longest run"), rows, marks), groups, None,
        )

    def _cut(self, e: BeamCut, groups: Groups | None) -> Described:
        parents = [set(c.members) - {c.added} for c in e.candidates]
        shared = set.intersection(*parents) if parents else set()
        same = same_set_notes([c.members for c in e.candidates])
        rows = tuple(
            (
                str(i), "keep" if c.survived else "cut", _marked((set(c.members) - shared) | {c.added}, c.added),
                _fmt(c.cost), _fmt(c.smoothness), str(c.rank_cost), str(c.rank_smooth), _fmt(c.score), same[i],
            )
            for i, c in enumerate(e.candidates)
        )
        marks = tuple("keep" if c.survived else "cut" for c in e.candidates)
        kept = sum(c.survived for c in e.candidates)
        notes = [
            (f"cost = inner − β·outer, β = {_fmt(e.beta)}; score = α·R(cost) + (1−α)·R(smooth): lowest kept, "
             "ties to the rougher, then the earlier"),
            RANK_LEGEND,
        ]
        if shared:
            notes.append(f"all hold {_members(sorted(shared))} (not repeated); \"= #k\": the same set as #k")
        elif any(same):
            notes.append("\"= #k\": the same set as candidate #k, added in another order")
        return (
            "beam cut",
            f"Group {e.group}, start {e.start}: cut at size {e.size} keeps {kept} of {len(e.candidates)}",
            tuple(notes),
            StepTable(("#", "", "members, +added", "cost", "smooth", "R(cost)", "R(smooth)", "score", "same"),
                      rows, marks),
            groups, e.group,
        )

    def _beam_final(self, e: BeamFinal, groups: Groups | None) -> Described:
        same = same_set_notes([c.members for c in e.candidates])
        rows = tuple((str(i), _members(sorted(c.members)), _fmt(c.cost), _fmt(c.smoothness), same[i])
                     for i, c in enumerate(e.candidates))
        marks = tuple("win" if i == e.best else "" for i in range(len(e.candidates)))
        costs = [c.cost for c in e.candidates]
        tie = tie_note([f"#{i}" for i in range(len(costs))], costs, max(costs), "the earliest candidate wins")
        return (
            "beam final",
            f"Group {e.group}, start {e.start}: best complete candidate #{e.best}, cost {_fmt(e.candidates[e.best].cost)}",
            (f"final cost uses β = {_fmt(e.beta)}; highest cost wins; smoothness does not enter the final pick",
             *([tie] if tie else [])),
            StepTable(("#", "members", "cost", "smooth", "same"), rows, marks), groups, e.group,
        )

    def _restarts(self, e: StartResults, groups: Groups | None) -> Described:
        order = sorted(range(len(e.starts)), key=lambda i: (-e.scores[i], i))
        best = order[0]
        shown = order[:TOP_ROWS]
        same = same_set_notes(e.members)
        rows = tuple((str(e.starts[i]), _fmt(e.scores[i]), _members(sorted(e.members[i])), same[i]) for i in shown)
        marks = tuple("win" if i == best else "" for i in shown)
        notes = [f"β = {_fmt(e.beta)}, γ = {e.gamma}; highest score wins, ties to the lowest start"]
        tie = tie_note([str(s) for s in e.starts], e.scores, e.scores[best], f"the lowest start, {e.starts[best]}, wins")
        if tie:
            notes.append(tie)
        if len(order) > TOP_ROWS:
            notes.append(f"best {TOP_ROWS} of {len(order)} restarts shown")
        return (
            "restarts",
            f"Group {e.group}: {len(e.starts)} restarts ({e.selection}), start {e.starts[best]} wins with {_fmt(e.scores[best])}",
            tuple(notes), StepTable(("start", "score", "members (sorted)", "same"), rows, marks), groups, e.group,
        )

    def _greedy_addition(self, e: StartResults, sub: int, groups: Groups | None) -> Described:
        winner = greedy_winner(e)
        order = e.members[winner]  # in the order the greedy search added them
        low = max(0, sub - SNAKE_WINDOW)
        rows = tuple((str(k), str(order[k]), _marked(order[: k + 1], order[k])) for k in range(low, sub + 1))
        marks = tuple("current" if k == sub else "" for k in range(low, sub + 1))
        what = "starts from" if sub == 0 else "adds"
        return (
            "greedy",
            f"Group {e.group}, start {e.starts[winner]} (the winning start): step {sub + 1}/{len(order)} {what} kernel {order[sub]}",
            (("each step adds the kernel with the largest summed distance to the set so far (lowest index on ties); "
              "the restarts table after these steps compares every start's final set"),),
            StepTable(("step", "kernel", "set so far, +new"), rows, marks), groups, e.group,
        )

    def _ranked(self, e: RankedSelection, groups: Groups | None) -> Described:
        kept = set(e.kept)
        if e.values:
            order = sorted(range(len(e.values)), key=lambda c: (-e.values[c], c))[:TOP_ROWS]
            rows = tuple((str(c), _fmt(e.values[c])) for c in order)
            marks = tuple("keep" if c in kept else "cut" for c in order)
            table: StepTable | None = StepTable(("channel", "value"), rows, marks)
        else:
            table = None
        return (
            "selection", f"Group {e.group}: {e.method} keeps {len(e.kept)} channels: {_members(sorted(kept))}",
            (), table, groups, e.group,
        )
