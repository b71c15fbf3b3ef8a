"""What reaches a run's actor: typed commands, through one bounded mailbox per run.

The engine holds a :class:`RunHandle` per active run (the send end of the
mailbox, the run's cancel scope, and ``done``); the actor holds the receive
end and handles every command in one dispatcher. A running actor drains its
mailbox between steps; a parked one (waiting for a running slot) awaits it.
There is no reader task per run.

``Cancel`` is also a signal: sending it cancels the run's scope at once, so
it interrupts a node that blocks. So is ``Abandon``, which also forbids the
actor any further write (its run belongs to another engine now). ``Drain``
asks the run to stop at its next step boundary, its last step checkpointed,
without ending (the engine is stopping). Every other command is taken between
steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import CapacityError
from .runs import RunRecord

#: Commands a run's mailbox holds before senders get CapacityError.
MAILBOX_SIZE = 16


@dataclass(frozen=True, slots=True)
class Cancel:
    """End the run ``cancelled`` now."""

    reason: str = "cancelled by request"


@dataclass(frozen=True, slots=True)
class Resume:
    """The input the run waited for was accepted and merged (by the engine)."""

    input: dict[str, Any]
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Signal:
    """Signals are stored for the run: apply them before the next step.

    The store's inbox is the source of truth (a signal is stored before its
    sender is answered); this command only says there is something to read,
    so one pending ``Signal`` is as good as several.
    """

    name: str
    updates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Start:
    """The run may execute now: it has a running slot (sent by the engine)."""


@dataclass(frozen=True, slots=True)
class Drain:
    """The engine stops: finish the node in flight, checkpoint, and stop without ending."""


@dataclass(frozen=True, slots=True)
class Abandon:
    """Stop now and write nothing more: the run is no longer this engine's.

    Sent when another engine claimed the run (its lease passed on), or when
    this engine could not reach its store for a whole lease.
    """

    reason: str


Command = Cancel | Resume | Signal | Start | Drain | Abandon

#: The one Start command (it carries nothing).
START = Start()


class RunHandle:
    """One active run's mailbox, cancel scope and ``done`` event.

    The engine sends (:meth:`send`); the run's actor takes (:meth:`take_nowait`
    between steps, :meth:`take` while it waits for its slot). The mailbox is
    a bounded Trio memory channel, opened on first use: a run that starts at
    once and is never sent a command (most runs) never pays for one.
    """

    __slots__ = (
        "_receive",
        "_send",
        "abandoned",
        "cancel_reason",
        "done",
        "draining",
        "epoch",
        "has_slot",
        "pending",
        "record",
        "run_id",
        "scope",
        "signal_queued",
        "since",
    )

    def __init__(self, run_id: str, epoch: int = 0) -> None:
        self.run_id = run_id
        #: The run's epoch as this engine holds it (its actor writes at it).
        self.epoch = epoch
        self._send: trio.MemorySendChannel[Command] | None = None
        self._receive: trio.MemoryReceiveChannel[Command] | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        #: Commands sent and not yet taken: the actor looks at this (an int)
        #: between steps instead of polling its channel.
        self.pending = 0
        #: Why the run was cancelled, once it was.
        self.cancel_reason: str | None = None
        #: A Signal command is in the mailbox and not yet taken.
        self.signal_queued = False
        #: The run's record as the actor last committed it, once ``done`` is set.
        self.record: RunRecord | None = None
        #: The run holds one of the engine's running slots.
        self.has_slot = False
        #: Why the actor must write nothing more (Abandon), once it must not.
        self.abandoned: str | None = None
        #: The engine stops: the run stops at its next step boundary.
        self.draining = False
        #: When the engine took the run (Trio clock): a lease renewal that
        #: started before it cannot have known of it.
        self.since = trio.current_time()

    def _open(self) -> tuple[trio.MemorySendChannel[Command], trio.MemoryReceiveChannel[Command]]:
        if self._send is None or self._receive is None:
            # (not open_memory_channel[Command](...): subscripting costs a microsecond)
            self._send, self._receive = trio.open_memory_channel(MAILBOX_SIZE)
        return self._send, self._receive

    def send(self, command: Command) -> None:
        """Post ``command`` to the run. Posting to a finished run does nothing.

        Raises:
            CapacityError: the mailbox is full (a Cancel is never refused: it
                cancels the run's scope whatever the mailbox holds).
        """
        if self.done.is_set():
            return
        if isinstance(command, Cancel):
            if self.cancel_reason is None:
                self.cancel_reason = command.reason
                self.scope.cancel()
            return
        if isinstance(command, Abandon):
            if self.abandoned is None:
                self.abandoned = command.reason
                self.scope.cancel()
            return
        if isinstance(command, Drain):
            # Never refused: the flag is what counts; the command (when there
            # is room) only makes the actor look at its mailbox.
            self.draining = True
            try:
                self._open()[0].send_nowait(command)
            except trio.WouldBlock:
                return  # a full mailbox is looked at anyway
            self.pending += 1
            return
        if isinstance(command, Signal):
            if self.signal_queued:
                return  # the one already queued reads every stored signal
            self.signal_queued = True
        try:
            self._open()[0].send_nowait(command)
        except trio.WouldBlock:
            if isinstance(command, Signal):
                self.signal_queued = False
            raise CapacityError(
                f"run {self.run_id!r} has {MAILBOX_SIZE} commands waiting; try again shortly",
                details={"run_id": self.run_id, "mailbox": MAILBOX_SIZE},
            ) from None
        self.pending += 1

    def take_nowait(self) -> Command:
        """For the actor: the next command (call only while ``pending``)."""
        self.pending -= 1
        return self._open()[1].receive_nowait()

    async def take(self) -> Command:
        """For the actor: wait for the next command."""
        command = await self._open()[1].receive()
        self.pending -= 1
        return command

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_reason is not None
