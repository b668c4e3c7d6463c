"""Decision traces (SPEC §4.3): typed, frozen events that every pruning stage emits so a person
can step through each decision (GKP's grouping and selection, in-train pruning's masks, AdaSAP's
adaptive radii and sharpness), with a stable JSON form documented in docs/TRACES.md."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar

from ..common.errors import WorkbenchError
from ..common.fileio import AtomicJsonLines, write_text_atomic

TRACE_FORMAT = "gkp-workbench/trace"
TRACE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 stored beam cuts' candidates whole
TRACE_LEVELS: tuple[str, ...] = ("decisions", "full")


class TraceError(WorkbenchError):
    """A trace file or record cannot be read."""


@dataclass(frozen=True)
class TraceEvent:
    """Base of every event: `kind` names the event type, `layer` the conv it belongs to."""

    kind: ClassVar[str] = ""
    layer: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists, nested records dicts) with `kind`, keys in
        sorted order: the event's JSON line, read back."""
        return json.loads(event_line(self))  # type: ignore[no-any-return]

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "TraceEvent":
        """Rebuild the typed event a `to_dict` produced; `TraceError` for anything else."""
        if not isinstance(data, dict):
            raise TraceError(f"a trace event must be a JSON object, got {type(data).__name__}")
        cls = EVENT_TYPES.get(data.get("kind"))  # type: ignore[arg-type]
        if cls is None:
            raise TraceError(f"unknown trace event kind {data.get('kind')!r}")
        fields = {k: v for k, v in data.items() if k != "kind"}
        if cls is BeamCut and "candidates" in fields:
            fields = BeamCut.from_version_1(fields)
        return _build(cls, fields)


@dataclass(frozen=True)
class LayerStart(TraceEvent):
    """A layer's pruning begins: its weight shape, `groups` (n), `kept` (S) and the methods."""

    kind: ClassVar[str] = "layer_start"
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    groups: int
    kept: int
    grouping: str
    selection: str
    compat: str


@dataclass(frozen=True)
class LayerSkipped(TraceEvent):
    """A conv left dense, and why."""

    kind: ClassVar[str] = "layer_skipped"
    reason: str


@dataclass(frozen=True)
class SnakeDeal(TraceEvent):
    """Snaking (SPEC §3.1), one entry per rank: `filters[r]` has key `values[r]` and is dealt to
    group `groups[r]`. `key` is `smoothness` (ascending) or `magnitude` (descending)."""

    kind: ClassVar[str] = "snake_deal"
    key: str
    descending: bool
    filters: tuple[int, ...]
    values: tuple[float, ...]
    groups: tuple[int, ...]


@dataclass(frozen=True)
class RandomGrouping(TraceEvent):
    """Seeded random equal-size filter groups (an ablation baseline)."""

    kind: ClassVar[str] = "random_grouping"
    filter_groups: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Clustering(TraceEvent):
    """One TMI clustering scheme's equal-size filter groups for this layer. For `tsne-dbscan`,
    `eps` is the DBSCAN radius found and `raw_clusters` how many clusters it gave before
    balancing; both are null for the other schemes."""

    kind: ClassVar[str] = "clustering"
    scheme: str
    filter_groups: tuple[tuple[int, ...], ...]
    eps: float | None = None
    raw_clusters: int | None = None


@dataclass(frozen=True)
class TmiTicket(TraceEvent):
    """One ticket epoch scored against every scheme (Eq. 4); per-scheme lists follow `schemes`."""

    kind: ClassVar[str] = "tmi_ticket"
    epoch: int
    schemes: tuple[str, ...]
    group_scores: tuple[tuple[float, ...], ...]
    gaps: tuple[tuple[float, ...], ...]
    gap_mean: tuple[float, ...]
    gap_var: tuple[float, ...]
    rank_mean: tuple[float, ...]
    rank_var: tuple[float, ...]
    score: tuple[float, ...]
    winner: str


@dataclass(frozen=True)
class TmiVote(TraceEvent):
    """The tickets' votes (`votes[i]` for `epochs[i]`), the tally and longest run of consecutive
    wins per scheme, and the scheme used for the layer."""

    kind: ClassVar[str] = "tmi_vote"
    schemes: tuple[str, ...]
    epochs: tuple[int, ...]
    votes: tuple[str, ...]
    tally: tuple[int, ...]
    longest_run: tuple[int, ...]
    winner: str


@dataclass(frozen=True)
class BeamCandidate:
    """One candidate at a beam cut: its members in insertion order (the start first, `added`
    last) and how the cut judged it."""

    members: tuple[int, ...]
    added: int
    cost: float
    smoothness: float
    rank_cost: int
    rank_smooth: int
    score: float
    survived: bool


@dataclass(frozen=True)
class BeamCut(TraceEvent):
    """A cut of one start's beam at set size `size` (Eq. 2 and Eq. 3 with `beta`), stored by
    column (trace version 2): candidate `i` is `prefixes[prefix[i]]` followed by `steps[j][i]`
    for each step since that prefix, and is judged by row `state[i]` of the per-set columns
    (candidates holding the same set share a row). `survivors` are candidate indices, best
    first; `candidates` gives each candidate whole."""

    kind: ClassVar[str] = "beam_cut"
    group: int
    start: int
    size: int
    beta: float
    prefixes: tuple[tuple[int, ...], ...]
    prefix: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    state: tuple[int, ...]
    cost: tuple[float, ...]
    smoothness: tuple[float, ...]
    rank_cost: tuple[int, ...]
    rank_smooth: tuple[int, ...]
    score: tuple[float, ...]
    survivors: tuple[int, ...]

    @property
    def candidates(self) -> tuple[BeamCandidate, ...]:
        """Every candidate whole, in generation order (entry by entry, each entry's proposals
        best first)."""
        survived = set(self.survivors)
        return tuple(
            BeamCandidate(self.prefixes[p] + path, path[-1], self.cost[s], self.smoothness[s], self.rank_cost[s],
                          self.rank_smooth[s], self.score[s], i in survived)
            for i, (p, s, path) in enumerate(zip(self.prefix, self.state, zip(*self.steps)))
        )

    def check(self) -> None:
        """`TraceError` unless the columns fit together (a record read from a file)."""
        count, states = len(self.prefix), len(self.cost)
        columns = [*self.steps, self.state]
        if not self.steps or any(len(c) != count for c in columns) or any(
            len(c) != states for c in (self.smoothness, self.rank_cost, self.rank_smooth, self.score)
        ):
            raise TraceError("beam_cut columns have different lengths")
        if not all(0 <= p < len(self.prefixes) for p in self.prefix) or not all(0 <= s < states for s in self.state) \
                or not all(0 <= i < count for i in self.survivors):
            raise TraceError("beam_cut refers to a prefix, set or candidate it does not have")

    @staticmethod
    def from_version_1(data: dict[str, Any]) -> dict[str, Any]:
        """A version-1 record (whole candidates) as this version's columns: each candidate's
        prefix is its members but the last, candidates of equal sets share a row, survivors are
        ordered by score, then rougher, then first."""
        if not isinstance(data.get("candidates"), list):
            raise TraceError("a version-1 beam_cut needs a candidates list")
        candidates = [_build(BeamCandidate, c) for c in data["candidates"]]
        if any(not c.members or c.members[-1] != c.added for c in candidates):
            raise TraceError("a beam_cut candidate's last member is not the kernel it added")
        prefixes: dict[tuple[int, ...], int] = {}
        sets: dict[frozenset[int], int] = {}
        firsts: dict[int, BeamCandidate] = {}  # each set's row holds its first candidate's values
        for c in candidates:
            prefixes.setdefault(c.members[:-1], len(prefixes))
            firsts.setdefault(sets.setdefault(frozenset(c.members), len(sets)), c)
        judged = list(firsts.values())
        order = sorted((i for i, c in enumerate(candidates) if c.survived),
                       key=lambda i: (candidates[i].score, -candidates[i].smoothness, i))
        rest = {k: v for k, v in data.items() if k != "candidates"}
        return {**rest, "prefixes": [list(p) for p in prefixes], "prefix": [prefixes[c.members[:-1]] for c in candidates],
                "steps": [[c.added for c in candidates]], "state": [sets[frozenset(c.members)] for c in candidates],
                "cost": [c.cost for c in judged], "smoothness": [c.smoothness for c in judged],
                "rank_cost": [c.rank_cost for c in judged], "rank_smooth": [c.rank_smooth for c in judged],
                "score": [c.score for c in judged], "survivors": order}


@dataclass(frozen=True)
class FinalCandidate:
    """A complete candidate of one start, scored for the final pick."""

    members: tuple[int, ...]
    cost: float
    smoothness: float


@dataclass(frozen=True)
class BeamFinal(TraceEvent):
    """One start's complete candidates with their final Eq. 3 cost; `best` indexes the first
    highest."""

    kind: ClassVar[str] = "beam_final"
    group: int
    start: int
    beta: float
    candidates: tuple[FinalCandidate, ...]
    best: int


@dataclass(frozen=True)
class StartResults(TraceEvent):
    """Every restart of one group: start kernel, its best complete set (insertion order) and
    score (Eq. 3 for `smooth-beam`, Eq. 5 for `greedy`), enough to replay the final pick."""

    kind: ClassVar[str] = "start_results"
    group: int
    selection: str
    beta: float
    gamma: int
    starts: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class RankedSelection(TraceEvent):
    """A baseline selection: `values[c]` per input channel (norm for `l2`, smoothness for
    `least-smooth`, empty for `random`) and the channels kept."""

    kind: ClassVar[str] = "ranked_selection"
    group: int
    method: str
    values: tuple[float, ...]
    kept: tuple[int, ...]


@dataclass(frozen=True)
class FinalChoice(TraceEvent):
    """The grouped kernels a group keeps (ascending), with the winning start and its score
    (both null for baselines)."""

    kind: ClassVar[str] = "final_choice"
    group: int
    kept: tuple[int, ...]
    score: float | None
    start: int | None


@dataclass(frozen=True)
class LayerDone(TraceEvent):
    """A layer's result as it enters the plan."""

    kind: ClassVar[str] = "layer_done"
    grouping: str
    selection: str
    filter_groups: tuple[tuple[int, ...], ...]
    kept_channels: tuple[tuple[int, ...], ...]
    achieved_ratio: float
    score: float | None


MODEL = ""  # the `layer` of events about the whole model rather than one conv


@dataclass(frozen=True)
class MaskSetup(TraceEvent):
    """In-train pruning (SPEC §8): a conv gets a trainable mask of `mask_shape` at `granularity`.
    `cost` is its dense cost in `measure` units; `reader` the masked conv reading its outputs
    directly (channel masks); `filter_groups` the fixed groups of grouped-kernel masks."""

    kind: ClassVar[str] = "mask_setup"
    granularity: str
    mask_shape: tuple[int, ...]
    measure: str
    cost: int
    reader: str | None
    grouping: str
    filter_groups: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class MaskEpoch(TraceEvent):
    """A conv's binary mask at the end of `epoch` (1-based): `phase` is `before` (the window has
    not started), `learning` or `frozen`; `turned_off` / `turned_on` are flat indices into the
    mask that changed since the previous epoch; the complexities are relative to the dense
    cost, `hw_loss` is L_HW at the epoch's end and `val_benign` the validation accuracy."""

    kind: ClassVar[str] = "mask_epoch"
    epoch: int
    phase: str
    on: int
    total: int
    turned_off: tuple[int, ...]
    turned_on: tuple[int, ...]
    layer_complexity: float
    model_complexity: float
    target: float
    hw_loss: float
    val_benign: float | None


@dataclass(frozen=True)
class MaskFreeze(TraceEvent):
    """The masks freeze after `epoch`: grouped-kernel masks keep the top `kept_per_group` of every
    group (equal counts), then, if the model's complexity misses the target by more than the
    tolerance, entries are completed toward it by their learned values. `turned_off` /
    `turned_on` are the entries the freeze changed; `learned_complexity` and
    `model_complexity` the model's complexity before and after."""

    kind: ClassVar[str] = "mask_freeze"
    epoch: int
    on: int
    total: int
    kept_per_group: int | None
    turned_off: tuple[int, ...]
    turned_on: tuple[int, ...]
    learned_complexity: float
    model_complexity: float
    target: float


@dataclass(frozen=True)
class RhoEpoch(TraceEvent):
    """AdaSAP's adaptive step (SPEC §9) on one layer over an epoch of `phase` (`warmup` or
    `pruning`): the smallest and largest radius any filter got in any of its `steps`, each
    filter's mean radius, and its radius and importance at the last step (whose least important
    filter had ρ_max)."""

    kind: ClassVar[str] = "rho_epoch"
    phase: str
    epoch: int
    steps: int
    rho_low: float
    rho_high: float
    rho_mean: tuple[float, ...]
    rho_last: tuple[float, ...]
    importance_last: tuple[float, ...]
    least_important: int


@dataclass(frozen=True)
class SharpnessMeasured(TraceEvent):
    """The model's sharpness `max_{‖ε‖≤rho} L(w+ε) − L(w)` at a point of the run (`when`:
    `before_prune`, `after_prune`, `after_finetune`), with the loss it started from."""

    kind: ClassVar[str] = "sharpness"
    when: str
    value: float
    loss: float
    rho: float
    steps: int
    images: int


@dataclass(frozen=True)
class ProgressivePrune(TraceEvent):
    """AdaSAP's progressive pruning: step `step` of `steps`, at training iteration `iteration`,
    re-planned with `method` at the scheduled `rate` and zeroed `zeroed` weights."""

    kind: ClassVar[str] = "progressive_prune"
    step: int
    steps: int
    iteration: int
    method: str
    rate: float
    zeroed: int


EVENT_TYPES: dict[str, type[TraceEvent]] = {
    cls.kind: cls
    for cls in (
        LayerStart, LayerSkipped, SnakeDeal, RandomGrouping, Clustering, TmiTicket, TmiVote,
        BeamCut, BeamFinal, StartResults, RankedSelection, FinalChoice, LayerDone,
        MaskSetup, MaskEpoch, MaskFreeze, RhoEpoch, SharpnessMeasured, ProgressivePrune,
    )
}

EventSink = Callable[[TraceEvent], None]


@dataclass(frozen=True)
class Tracer:
    """Where events go and how much detail they carry (`decisions` or `full`)."""

    emit: EventSink
    level: str = "decisions"

    @property
    def full(self) -> bool:
        return self.level == "full"


def event_line(event: TraceEvent) -> str:
    """One JSON line (sorted keys, no newline) for `event`."""
    return _ENCODE(_record_dict(event))


class TraceFile:
    """An event sink that streams a trace into a JSON-lines file (header-less, as batch mode
    writes `decisions.jsonl`): each event is encoded as it arrives and a layer's lines are
    written at once when the layer ends. The file replaces `path` only when the `with` block
    ends without an exception."""

    _LAYER_ENDS = frozenset({LayerDone.kind, LayerSkipped.kind})

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = AtomicJsonLines(path)
        self._lines: list[str] = []

    def emit(self, event: TraceEvent) -> None:
        self._lines.append(event_line(event))
        if event.kind in self._LAYER_ENDS:
            self.flush()

    def flush(self) -> None:
        self._file.write_lines(self._lines)
        self._lines = []

    def __enter__(self) -> "TraceFile":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._file.__exit__(exc_type, exc, tb)


def write_jsonl(path: str | os.PathLike[str], events: Iterable[TraceEvent]) -> None:
    """Atomically write a header line then one line per event."""
    header = json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION}, sort_keys=True)
    lines = [header, *(event_line(e) for e in events)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[TraceEvent]:
    """Read a trace written by `write_jsonl` (or a header-less stream of event lines)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    events: list[TraceEvent] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"trace {path} line {number} is not valid JSON: {exc.msg}") from None
        if isinstance(data, dict) and data.get("format") == TRACE_FORMAT:
            if data.get("version") not in READABLE_VERSIONS:
                raise TraceError(
                    f"trace {path} has version {data.get('version')!r}; this workbench reads "
                    f"versions {', '.join(map(str, READABLE_VERSIONS))}"
                )
            continue
        try:
            events.append(TraceEvent.from_dict(data))
        except TraceError as exc:
            raise TraceError(f"trace {path} line {number}: {exc}") from None
    return events


_ENCODE = json.JSONEncoder().encode  # the dicts are built with sorted keys: same text as sort_keys=True


def _record_dict(record: Any) -> dict[str, Any]:
    """A trace record (event or nested record) as a JSON-ready dict with sorted keys."""
    keys, getter, converters = _codec(type(record))
    values = list(getter(record))
    for position, convert in converters:
        values[position] = convert(values[position])
    return dict(zip(keys, values))


@cache
def _codec(cls: type) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]], tuple[tuple[int, Callable[[Any], Any]], ...]]:
    """For a record class: its keys (fields and, for events, `kind`) sorted, one getter for all
    their values, and the converter of each value that is not JSON-ready as it is (nested
    records become dicts), so no record needs `dataclasses.asdict`."""
    hints = _hints(cls)
    keys = tuple(sorted([*hints, *(["kind"] if issubclass(cls, TraceEvent) else [])]))
    converters = tuple((i, c) for i, key in enumerate(keys) if key != "kind" and (c := _converter(hints[key])))
    getter = attrgetter(*keys) if len(keys) > 1 else (lambda record: (getattr(record, keys[0]),))
    return keys, getter, converters  # type: ignore[return-value]


def _converter(hint: Any) -> Callable[[Any], Any] | None:
    """How a field's value becomes JSON-ready: only tuples of records need it (the encoder
    writes tuples as arrays)."""
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return lambda records: [_record_dict(r) for r in records]
    return None


@cache
def _hints(cls: type) -> dict[str, Any]:
    """The annotated type of each field of record class `cls` (not its class variables)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Instantiate dataclass `cls` from JSON data, converting by the field annotations."""
    hints = _hints(cls)
    unknown = data.keys() - hints.keys()
    if unknown:
        raise TraceError(f"{cls.__name__} record has unknown fields {sorted(unknown)}")
    try:
        record = cls(**{name: _convert(hints[name], value) for name, value in data.items()})
    except TypeError as exc:
        raise TraceError(f"bad {cls.__name__} record: {exc}") from None
    if hasattr(record, "check"):
        record.check()
    return record


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        if not isinstance(value, list):
            raise TraceError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TraceError(f"expected an object for {hint.__name__}, got {value!r}")
        return _build(hint, value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise TraceError(f"expected {getattr(hint, '__name__', hint)}, got {value!r}")
