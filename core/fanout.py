"""Parallel and map nodes: branches on a Trio nursery, checkpointed one by one, merged in order.

A fan-out node (``parallel`` or ``map``, see :class:`~core.graph.FanOut`)
runs its branches as tasks of one nursery under a ``CapacityLimiter``
(``max_concurrency``): no branch outlives the node, and cancelling the run
cancels every branch at once. Each branch starts from a copy of the state at
the fan-out (a map's copy holds its item under ``as``) and walks its own
sub-graph with its own loop counters. Its steps count toward the run's
``max_steps``.

**Checkpoints.** Every branch step is one checkpoint of the run, taken under
a lock so that the run's log stays one gapless sequence: the step's log
entries (tagged ``branch``, and ``item`` in a map) and the run record, whose
``fanout`` field holds each started branch's progress: its status, current
node, step and loop counters; its whole state while it runs; only what it
changed (and its collected value) once it has completed; its error if it
failed. After a crash the fan-out resumes from that field: completed and
failed branches are not run again, running ones resume at their own node
(the step that was interrupted runs again, as a run's does), the others
start. A map's items are evaluated again on resume: the run's state does not
change during a fan-out, so they are the same.

**The join** folds the branches' changes into the state at the fan-out, in
declaration (parallel) or item (map) order, never in completion order (see
:func:`merge`), fills a map's ``collect`` list, validates the result with
the state model, and writes it with ``fanout_completed`` in the fan-out
node's step checkpoint.

**Failure.** Fail fast (the default): the first branch that fails cancels
the others and fails the run (``branch_failed``, naming the branch). With a
tolerance, failed branches are recorded and the run goes on while their
number stays within it; the first failure beyond it fails the run.

A fan-out nested in a branch is one step of that branch: its inner branches
are not checkpointed one by one, and a crash runs it again as a whole.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic_core
import trio
from pydantic import BaseModel, ValidationError

from .cancellation import is_cancellation
from .context import RunContext
from .errors import (
    ConditionError,
    ExpressionEvaluationError,
    RunFailure,
    StateValidationError,
)
from .graph import Branch, FanOut, Graph, Node
from .logs import Event, Level, bound_data, bound_text
from .planning import decide
from .registry import Tool
from .runs import branch_label

YIELD_INTERVAL_S = 0.002
"""A branch yields to the scheduler at least this often (as a run's steps do)."""

if TYPE_CHECKING:
    from .actor import RunActor


class MergeConflictError(Exception):
    """Two branches changed one key whose reducer is ``conflict``."""

    def __init__(self, key: str, branches: Sequence[str]) -> None:
        super().__init__(
            f"state key {key!r} was changed by several branches ({', '.join(branches)}) "
            "and has no reducer; give it one in merge.keys"
        )
        self.key = key
        self.branches = list(branches)


class ReducerError(Exception):
    """A reducer could not fold the values it was given."""

    def __init__(self, key: str, reducer: str, message: str) -> None:
        super().__init__(f"reducer {reducer} of state key {key!r} failed: {message}")
        self.key = key


def changes(
    base: Mapping[str, Any], final: Mapping[str, Any], exclude: Sequence[str] = ()
) -> dict[str, Any]:
    """The keys a branch changed (or added): its contribution to the join."""
    return {
        k: v
        for k, v in final.items()
        # 1 -> True, or 1 -> 1.0, is a change (== would say not)
        if k not in exclude and (k not in base or type(base[k]) is not type(v) or base[k] != v)
    }


def _tail(base: Any, value: Any) -> list[Any]:
    """What a branch added to a list: the items after the fan-out's list when the
    branch kept it as a prefix, else its whole list."""
    if not isinstance(value, list):
        return [value]
    if isinstance(base, list) and value[: len(base)] == base:
        return value[len(base) :]
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reduce(key: str, reducer: str | Tool, base: Any, values: list[Any]) -> Any:
    name = reducer if isinstance(reducer, str) else reducer.name
    try:
        if isinstance(reducer, Tool):
            return reducer.func(copy.deepcopy(base), values)
        if reducer in ("append", "extend") and not isinstance(base, list | None):
            raise TypeError(f"the value at the fan-out is a {type(base).__name__}, not a list")
        numbers = [*values, *([base] if base is not None else [])]
        if reducer == "sum" and not all(_number(v) for v in numbers):
            raise TypeError("sum takes numbers (not booleans or strings)")
        if reducer == "keep":
            return base  # a branch's working field: its changes stay in the branch
        if reducer == "replace":
            return values[-1]
        if reducer == "append":
            return [*(base if isinstance(base, list) else []), *values]
        if reducer == "extend":
            out = list(base) if isinstance(base, list) else []
            for value in values:
                if not isinstance(value, list):
                    raise TypeError(f"a branch's value is a {type(value).__name__}, not a list")
                out.extend(_tail(base, value))
            return out
        if reducer == "sum":
            start = base if base is not None else 0
            return start + sum(v - start for v in values)
        if reducer == "min":
            return min(values)
        if reducer == "max":
            return max(values)
        if reducer == "merge":
            merged: dict[str, Any] = dict(base) if isinstance(base, dict) else {}
            for value in values:
                if not isinstance(value, dict):
                    raise TypeError(f"{type(value).__name__} is not an object")
                merged.update(value)
            return merged
    except BaseException as exc:  # a user reducer (SystemExit included), or wrong types
        if is_cancellation(exc):
            raise
        raise ReducerError(key, name, f"{type(exc).__name__}: {exc}") from exc
    raise ReducerError(key, name, "unknown reducer")  # pragma: no cover - checked at compile


def merge(
    base: Mapping[str, Any],
    contributions: Sequence[tuple[str, Mapping[str, Any]]],
    reducers: Mapping[str, str | Tool],
    default: str | Tool,
) -> dict[str, Any]:
    """The state after the join: ``base`` with each key's contributions folded.

    ``contributions`` are (branch label, changed keys) in declaration or item
    order; each key's values are folded in that order, whatever order the
    branches finished in. A key changed by one branch takes its value unless
    its reducer says otherwise (``append``, ``extend`` and ``sum`` fold even a
    single value, so that the result does not depend on how many branches
    changed it).

    Raises:
        MergeConflictError: a key with the ``conflict`` reducer changed in two branches.
        ReducerError: a reducer failed.
    """
    by_key: dict[str, list[tuple[str, Any]]] = {}
    for label, changed in contributions:
        for key, value in changed.items():
            by_key.setdefault(key, []).append((label, value))
    out = dict(base)
    for key, found in by_key.items():
        reducer = reducers.get(key, default)
        values = [value for _, value in found]
        if reducer == "conflict":
            if len(found) > 1:
                raise MergeConflictError(key, [label for label, _ in found])
            out[key] = values[0]
            continue
        out[key] = _reduce(key, reducer, base.get(key), values)
    return out


@dataclass(slots=True)
class _Branch:
    """One branch's run-time progress (what ``RunRecord.fanout`` holds, and the model)."""

    key: str
    label: str
    item: int | None
    spec: Branch
    order: int
    status: str = "running"
    node: str | None = None
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    loop_counters: dict[str, int] = field(default_factory=dict)
    changed: dict[str, Any] | None = None
    collected: Any = None
    error: dict[str, Any] | None = None
    model: BaseModel | None = None

    def stored(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "node": self.node, "step": self.step}
        if self.status == "running":
            out["state"] = self.state
            out["loop_counters"] = self.loop_counters
        elif self.status == "completed":
            out["changes"] = self.changed or {}
            out["collected"] = self.collected
        elif self.error is not None:
            out["error"] = self.error
        return out


Event_ = tuple[str, str, Level, str | None, dict[str, Any]]
"""A log entry to be (event, message, level, node, data): seqs are given under the lock."""


class _BranchFailed(Exception):
    def __init__(self, failure: RunFailure, events: list[Event_]) -> None:
        self.failure = failure
        self.events = events


class FanOutRun:
    """One execution of a fan-out node by a run's actor (see the module docstring)."""

    def __init__(
        self, actor: RunActor, node: Node, fan: FanOut, root: FanOutRun | None = None
    ) -> None:
        self.actor = actor
        #: The outermost fan-out: a nested one (in a branch) is one step of its
        #: branch, not checkpointed; its steps are counted there (max_steps).
        self.root = root or self
        #: Steps of nested fan-outs not yet added to the run's step count.
        self.nested_steps = 0
        self.node = node
        self.fan = fan
        self.lock = trio.Lock()
        self.failed: list[_Branch] = []
        self.fatal: BaseException | None = None
        self.failure: RunFailure | None = None
        self.scope: trio.CancelScope | None = None
        self.last_yield = time.perf_counter()
        self._encoded: bytes | None = None

    def encoded_base(self, base: dict[str, Any]) -> bytes:
        """The state at the fan-out as JSON, encoded once: each branch decodes its own
        copy (several times faster than a deep copy of the same dict)."""
        if self._encoded is None:
            self._encoded = pydantic_core.to_json(base)
        return self._encoded

    @property
    def nested(self) -> bool:
        """A fan-out inside a branch (one step of it, not checkpointed)."""
        return self.root is not self

    # -- the whole node ------------------------------------------------------------

    async def run(self, base: dict[str, Any]) -> tuple[dict[str, Any], list[Event_]]:
        """Run (or resume) the fan-out from ``base``; the merged state and the join's events.

        Raises:
            _RunFailed (the actor's): the run fails (a branch, the merge, the items).
        """
        actor, fan, node = self.actor, self.fan, self.node
        failed = actor.run_failed
        items: list[Any] = []
        if fan.kind == "map":
            items = self.items(base)
            keys = [str(i) for i in range(len(items))]
        else:
            keys = [b.key for b in fan.branches]
        stored = actor.record.fanout
        resumed = (
            not self.nested
            and stored is not None
            and stored.get("node") == node.id
            and stored.get("size") == len(keys)
        )
        branches: dict[str, _Branch] = {}
        for index, key in enumerate(keys):
            spec = fan.branches[0] if fan.kind == "map" else fan.branches[index]
            label = branch_label(node.id, fan.kind, key)
            branch = _Branch(key, label, index if fan.kind == "map" else None, spec, index)
            progress = stored["branches"].get(key) if resumed and stored is not None else None
            if progress is not None:
                branch.status = progress["status"]
                branch.node = progress.get("node")
                branch.step = progress.get("step", 0)
                branch.state = progress.get("state") or {}
                branch.loop_counters = progress.get("loop_counters") or {}
                branch.changed = progress.get("changes")
                branch.collected = progress.get("collected")
                branch.error = progress.get("error")
                if branch.status == "cancelled":
                    branch.status = "running"  # interrupted by a crash, not by a choice
            branches[key] = branch
        self.branches = branches
        self.failed = [b for b in branches.values() if b.status == "failed"]
        if not self.nested:
            if resumed:
                done = sum(b.status in ("completed", "failed") for b in branches.values())
                await self.commit(
                    None,
                    [
                        (
                            Event.FANOUT_RESUMED,
                            f"{fan.kind} {node.id} resumed: {done} of {len(keys)} branches done",
                            Level.INFO,
                            node.id,
                            {"kind": fan.kind, "size": len(keys), "done": done},
                        )
                    ],
                )
            else:
                await self.commit(
                    None,
                    [
                        (
                            Event.FANOUT_STARTED,
                            f"{fan.kind} {node.id} started: {len(keys)} branches",
                            Level.INFO,
                            node.id,
                            {"kind": fan.kind, "size": len(keys)},
                        )
                    ],
                    start=True,
                )
        self.check_tolerance(raise_now=True)
        limiter = trio.CapacityLimiter(fan.max_concurrency)
        todo = [b for b in branches.values() if b.status not in ("completed", "failed")]
        with trio.move_on_after(node.timeout_s or math.inf) as timer:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                for branch in todo:
                    nursery.start_soon(self.guarded, branch, base, items, limiter)
        if timer.cancelled_caught and self.fatal is None and self.failure is None:
            assert node.timeout_s is not None
            raise failed(
                RunFailure(
                    "node_timeout",
                    f"{fan.kind} {node.id} timed out after {node.timeout_s:g}s "
                    "(its branches were cancelled)",
                    node=node.id,
                )
            )
        if self.fatal is not None:
            raise self.fatal
        if self.failure is not None:
            raise failed(self.failure)
        unfinished = [b.label for b in branches.values() if b.status not in ("completed", "failed")]
        if unfinished:
            # Only a tool that let a Cancelled escape can end a branch this way.
            raise failed(
                RunFailure(
                    "branch_failed",
                    f"branch {unfinished[0]} of {fan.kind} {node.id} ended without completing "
                    "(a tool let trio.Cancelled escape)",
                    node=node.id,
                    extra={"branch": unfinished[0], "failed": unfinished},
                )
            )
        # The join, in declaration or item order.
        exclude = [n for n in (fan.as_name, fan.collect_from) if n is not None]
        contributions = [
            (b.label, b.changed or {}) for b in branches.values() if b.status == "completed"
        ]
        try:
            merged = merge(base, contributions, fan.reducers, fan.default)
        except MergeConflictError as exc:
            raise failed(
                RunFailure(
                    "merge_conflict",
                    f"{fan.kind} {node.id}: {exc}",
                    node=node.id,
                    extra={"key": exc.key, "branches": exc.branches},
                )
            ) from None
        except ReducerError as exc:
            raise failed(
                RunFailure("merge_failed", f"{fan.kind} {node.id}: {exc}", node=node.id)
            ) from None
        for name in exclude:
            if name == fan.as_name:
                if name in base:
                    merged[name] = base[name]
                else:
                    merged.pop(name, None)
        if fan.collect_into is not None:
            merged[fan.collect_into] = [
                branches[k].collected if branches[k].status == "completed" else None for k in keys
            ]
        data: dict[str, Any] = {
            "kind": fan.kind,
            "size": len(keys),
            "completed": sum(b.status == "completed" for b in branches.values()),
        }
        if self.failed:
            data["failed"] = [b.label for b in self.failed]
        events: list[Event_] = [
            (
                Event.FANOUT_COMPLETED,
                f"{fan.kind} {node.id} completed: {data['completed']} of {len(keys)} branches"
                + (f", {len(self.failed)} failed" if self.failed else ""),
                Level.WARNING if self.failed else Level.INFO,
                node.id,
                data,
            )
        ]
        return merged, events

    def items(self, base: dict[str, Any]) -> list[Any]:
        fan, node = self.fan, self.node
        failed = self.actor.run_failed
        assert fan.items is not None
        try:
            items = fan.items.evaluate(base)
        except ExpressionEvaluationError as exc:
            raise failed(
                RunFailure("map_items_failed", f"map {node.id}: items: {exc.message}", node=node.id)
            ) from None
        if isinstance(items, tuple):
            items = list(items)
        if not isinstance(items, list):
            raise failed(
                RunFailure(
                    "map_items_invalid",
                    f"map {node.id}: items gave a {type(items).__name__}, not a list",
                    node=node.id,
                )
            )
        if len(items) > fan.max_items:
            raise failed(
                RunFailure(
                    "map_too_large",
                    f"map {node.id}: {len(items)} items; max_items is {fan.max_items}",
                    node=node.id,
                    extra={"items": len(items), "max_items": fan.max_items},
                )
            )
        return items

    def tolerated(self) -> bool:
        fan, n = self.fan, len(self.failed)
        if fan.fail_fast:
            return n == 0
        if fan.max_failures is not None:
            return n <= fan.max_failures
        assert fan.max_failure_pct is not None
        # (18.4% of 375 is 69, not the 68.99... floats give)
        return n <= math.floor(len(self.branches) * fan.max_failure_pct / 100 + 1e-9)

    def check_tolerance(self, last: _Branch | None = None, *, raise_now: bool = False) -> None:
        """Fail the fan-out if the failed branches are over the tolerance (``last``:
        the branch that just failed, named in the run's error)."""
        if self.tolerated():
            return
        last = last or self.failed[-1]
        fan, node = self.fan, self.node
        if fan.fail_fast:
            message = f"branch {last.label} of {fan.kind} {node.id} failed: " + str(
                (last.error or {}).get("message", "")
            )
        else:
            message = (
                f"{len(self.failed)} branches of {fan.kind} {node.id} failed, over the "
                f"tolerance; the last: {last.label}"
            )
        self.failure = RunFailure(
            "branch_failed",
            message,
            node=node.id,
            extra={
                "branch": last.label,
                "failed": [b.label for b in self.failed],
                "error": last.error,
            },
        )
        if raise_now:
            raise self.actor.run_failed(self.failure)
        if self.scope is not None:
            self.scope.cancel()

    # -- checkpoints -------------------------------------------------------------------

    async def commit(
        self,
        branch: _Branch | None,
        events: Sequence[Event_],
        *,
        steps: int = 0,
        start: bool = False,
    ) -> None:
        """One checkpoint: ``events`` as log entries and ``branch``'s progress, in order."""
        if self.nested:
            # A nested fan-out is one step of its branch (not checkpointed); its
            # steps still count toward max_steps, with the branch's next checkpoint.
            root = self.root
            actor = self.actor
            if steps and actor.record.step + root.nested_steps + steps > actor.graph.max_steps:
                node = events[-1][3] or self.node.id
                raise _BranchFailed(actor.max_steps_failure(node), [])
            root.nested_steps += steps
            return
        # A free lock is taken without a trip through the scheduler (Lock.acquire
        # yields even when the lock is free): one checkpoint per branch step.
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()
        try:
            await self._commit(branch, events, steps, start)
        finally:
            self.lock.release()

    async def _commit(
        self, branch: _Branch | None, events: Sequence[Event_], steps: int, start: bool
    ) -> None:
        """:meth:`commit` with the lock held."""
        actor = self.actor
        own = steps
        steps += self.nested_steps  # counted already (see the nested case of commit)
        self.nested_steps = 0
        if own and actor.record.step + steps > actor.graph.max_steps:
            # Checked under the lock: branches running at once cannot pass it together.
            # The step does not start: its node_started (the last event) is not written.
            node = events[-1][3] or self.node.id
            raise _BranchFailed(actor.max_steps_failure(node), list(events[:-1]))
        tags: dict[str, Any] = {} if branch is None else {"branch": branch.label}
        if branch is not None and branch.item is not None:
            tags["item"] = branch.item
        entries = [
            actor.make_entry(ev, message, level, node, {**data, **tags} if tags else data)
            for ev, message, level, node, data in events
        ]
        record = actor.record
        fanout = record.fanout if not start and record.fanout is not None else None
        if fanout is None or fanout.get("node") != self.node.id:
            fanout = {
                "node": self.node.id,
                "kind": self.fan.kind,
                "size": len(self.branches),
                "branches": {},
            }
        if branch is not None:
            progress = {**fanout["branches"], branch.key: branch.stored()}
            if self.fan.kind == "parallel" and len(progress) > len(fanout["branches"]):
                # In declaration order (a map's keys are its item indexes: the
                # record's reader orders them, see runs.fanout_view).
                progress = {k: progress[k] for k in self.branches if k in progress}
            fanout = {**fanout, "branches": progress}
        # Shielded: a cancel (the run's, or a sibling's failure) cannot land between
        # the store taking the checkpoint and the actor knowing it did.
        with trio.CancelScope(shield=True):
            await actor.save_checkpoint(entries, fanout=fanout, step=record.step + steps)

    # -- one branch --------------------------------------------------------------------

    async def guarded(
        self, branch: _Branch, base: dict[str, Any], items: list[Any], limiter: trio.CapacityLimiter
    ) -> None:
        try:
            try:
                async with limiter:
                    await self.walk(branch, base, items)
            except _BranchFailed as exc:
                branch.status = "failed"
                branch.error = exc.failure.as_dict()
                self.failed.append(branch)
                self.failed.sort(key=lambda b: b.order)
                data = {"error": branch.error}
                event: Event_ = (
                    Event.BRANCH_FAILED,
                    f"branch {branch.label} failed: {exc.failure.message}",
                    Level.ERROR,
                    exc.failure.node,
                    data,
                )
                await self.commit(branch, [*exc.events, event])
                self.check_tolerance(branch)
        except BaseException as exc:
            if is_cancellation(exc):
                raise
            # The run's own failures (a checkpoint refused, the log full, the run
            # taken over): the first one ends the fan-out and is the run's.
            if self.fatal is None:
                self.fatal = exc
            if self.scope is not None:
                self.scope.cancel()

    async def walk(self, branch: _Branch, base: dict[str, Any], items: list[Any]) -> None:
        """The branch from where it is to its end (its steps checkpointed one by one)."""
        actor = self.actor
        graph: Graph = branch.spec.graph
        limits = actor.limits
        events: list[Event_] = []
        if branch.node is None:
            state = pydantic_core.from_json(self.encoded_base(base))
            if self.fan.as_name is not None and branch.item is not None:
                state[self.fan.as_name] = copy.deepcopy(items[branch.item])
            branch.state = state
            branch.node = graph.start_node
            branch.step = 1
            events.append(
                (
                    Event.BRANCH_STARTED,
                    f"branch {branch.label} started",
                    Level.INFO,
                    graph.start_node,
                    {},
                )
            )
            events.append(
                (
                    Event.NODE_STARTED,
                    graph.nodes[graph.start_node].started_message,
                    Level.INFO,
                    graph.start_node,
                    {"step": branch.step},
                )
            )
            await self.commit(branch, events, steps=1)
            events = []
        elif not self.nested:
            # Resumed after a crash: the step that was interrupted runs again.
            event: Event_ = (
                Event.NODE_STARTED,
                graph.nodes[branch.node].started_message,
                Level.INFO,
                branch.node,
                {"step": branch.step, "resumed": True},
            )
            await self.commit(branch, [event])
        while True:
            node_id = branch.node
            assert node_id is not None
            node = graph.nodes[node_id]
            ctx = None
            if node.fanout is not None:
                result: Any = await self.nested_fanout(node, branch)
            else:
                tool = node.tool
                assert tool is not None  # waits are refused in branches at validation
                ctx = (
                    RunContext(
                        actor.run_id,
                        actor.graph.id,
                        node_id,
                        branch.step,
                        1,
                        _max_lines=limits.max_log_lines_per_step,
                    )
                    if tool.arity == 2
                    else None
                )
                result = await self.call(node, branch, ctx)
            events = self.custom(ctx)
            try:
                applied = graph.state.apply(branch.state, result, node_id)
            except StateValidationError as exc:
                raise _BranchFailed(
                    RunFailure(
                        "state_invalid", exc.message, node=node_id, extra={"errors": exc.errors}
                    ),
                    events,
                ) from None
            if applied is not None:
                branch.model, state = applied
                size = len(pydantic_core.to_json(state))
                if size > limits.max_state_bytes:
                    raise _BranchFailed(
                        RunFailure(
                            "state_too_large",
                            f"node {node_id} made the state {size} bytes; the limit is "
                            f"{limits.max_state_bytes}",
                            node=node_id,
                        ),
                        events,
                    )
                branch.state = state
            try:
                source: BaseModel | Callable[[], BaseModel] = (
                    branch.model
                    if branch.model is not None
                    else functools.partial(graph.state.load, branch.state)
                )
                decision = decide(graph, node_id, source, branch.state, branch.loop_counters)
            except ConditionError as exc:
                raise _BranchFailed(
                    RunFailure(exc.reason, exc.message, node=exc.node, edge=exc.edge), events
                ) from None
            branch.model = None
            events.append(
                (
                    Event.NODE_COMPLETED,
                    node.completed_message,
                    Level.INFO,
                    node_id,
                    {"step": branch.step},
                )
            )
            for spent in decision.exhausted:
                events.append(
                    (
                        Event.LOOP_EXHAUSTED,
                        f"loop {spent.key} reached max_iterations={spent.max_iterations}",
                        Level.WARNING,
                        node_id,
                        {"edge": spent.key, "max_iterations": spent.max_iterations},
                    )
                )
            edge = decision.edge
            if edge is None:
                exclude = [n for n in (self.fan.as_name, self.fan.collect_from) if n is not None]
                branch.changed = changes(base, branch.state, exclude)
                if self.fan.collect_from is not None:
                    branch.collected = branch.state.get(self.fan.collect_from)
                branch.status = "completed"
                events.append(
                    (
                        Event.BRANCH_COMPLETED,
                        f"branch {branch.label} completed",
                        Level.INFO,
                        node_id,
                        {"steps": branch.step, "changed": sorted(branch.changed)[:50]},
                    )
                )
                await self.commit(branch, events)
                return
            data: dict[str, Any] = {"edge": edge.key, "type": edge.type}
            if edge.type == "loop":
                branch.loop_counters = {
                    **branch.loop_counters,
                    edge.key: branch.loop_counters.get(edge.key, 0) + 1,
                }
                data["iteration"] = branch.loop_counters[edge.key]
            events.append((Event.EDGE_TAKEN, edge.taken_message, Level.INFO, node_id, data))
            branch.step += 1
            branch.node = edge.target
            events.append(
                (
                    Event.NODE_STARTED,
                    graph.nodes[edge.target].started_message,
                    Level.INFO,
                    edge.target,
                    {"step": branch.step},
                )
            )
            await self.commit(branch, events, steps=1)
            now = time.perf_counter()
            if now - self.last_yield >= YIELD_INTERVAL_S:
                # Inline tools on a memory store never block: yield now and then,
                # so that siblings, other runs and a cancel get their turn.
                self.last_yield = now
                await trio.lowlevel.checkpoint()

    async def nested_fanout(self, node: Node, branch: _Branch) -> dict[str, Any]:
        assert node.fanout is not None
        inner = FanOutRun(self.actor, node, node.fanout, root=self.root)
        try:
            merged, _ = await inner.run(branch.state)
        except self.actor.run_failed_type as exc:
            raise _BranchFailed(exc.failure, []) from None
        return merged

    def custom(self, ctx: RunContext | None) -> list[Event_]:
        if ctx is None or not (ctx._lines or ctx._dropped):
            return []
        max_data = self.actor.limits.max_log_data_bytes
        return [
            (Event.CUSTOM, msg, level, ctx.node_id, bound_data(data, max_data) if data else {})
            for _ts, level, msg, data in ctx.take_lines()
        ]

    async def call(self, node: Node, branch: _Branch, ctx: RunContext | None) -> Any:
        """The node's tool with its timeout and retries; a last failure fails the branch."""
        actor = self.actor
        limit = actor.limits.max_log_message_chars
        attempt = 1
        while True:
            if ctx is not None:
                ctx.attempt = attempt
            error: BaseException
            model = branch.model
            branch.model = None
            if model is None:
                try:
                    model = actor.graph.state.load(branch.state)
                except ValidationError as exc:
                    raise _BranchFailed(
                        RunFailure(
                            "state_invalid",
                            f"the branch's state does not fit the state model: {exc}",
                            node=node.id,
                        ),
                        self.custom(ctx),
                    ) from None
            try:
                if node.timeout_s is None:
                    return await actor.invoke(node, model, ctx)
                with trio.move_on_after(node.timeout_s):
                    return await actor.invoke(node, model, ctx)
                error = TimeoutError(f"node timed out after {node.timeout_s:g}s")
                code = "node_timeout"
            except BaseException as exc:
                if is_cancellation(exc):
                    raise
                error, code = exc, "node_failed"
            text = bound_text(str(error), limit)
            message = bound_text(f"node {node.id} failed: {type(error).__name__}: {text}", limit)
            if attempt >= node.retry.max_attempts:
                events = self.custom(ctx)
                events.append(
                    (
                        Event.NODE_FAILED,
                        message,
                        Level.ERROR,
                        node.id,
                        {"attempt": attempt, "type": type(error).__name__, "error": text},
                    )
                )
                raise _BranchFailed(
                    RunFailure(
                        code,
                        message,
                        node=node.id,
                        error_type=type(error).__name__,
                        extra={"attempts": attempt},
                    ),
                    events,
                )
            from .actor import _backoff

            delay = _backoff(node, attempt)
            events = self.custom(ctx)
            events.append(
                (
                    Event.NODE_RETRYING,
                    f"{message}; retrying in {delay:.3g}s",
                    Level.WARNING,
                    node.id,
                    {"attempt": attempt, "delay_s": delay, "type": type(error).__name__},
                )
            )
            await self.commit(branch, events)
            await trio.sleep(delay)
            attempt += 1
