"""A pipeline's scheduler: which items are inside, when each is finished, in
what order results leave, and what a dead worker's slot says was lost.

Pure bookkeeping (no process, no ring, no clock): the parent feeds it what it
reads from the source, what arrives on the output ring and what it finds in a
dead worker's slot; tests/test_pipeline_sched.py checks it against a model.

Items, credits, paths
---------------------
Source item ``seq`` enters with credit 1. A message carries a share of it,
2**-e, written as the exponent ``e``. A function stage passes its input's
share on whole; a generator stage splits it among its outputs: output i
(0-based) of an input with share e gets e+i+1, except the last, which gets
e+i (what is left), so the shares always add up to the input's; an input
that yields nothing, fails, or is lost returns its (remaining) share to the
parent directly. An item is finished when the shares the parent got for it
add up to 1, without anyone counting its outputs first.

``path`` names a node of an item's tree of outputs: the output index at each
generator stage so far. Outputs of one item leave in path order.

Worker slots
------------
Each worker owns a row of SLOT_WORDS int64 words in shared memory (written by
the worker, read by the parent after the worker died)::

    [0] state  [1] seq  [2] credit exponent e  [3] progress  [4] len(path)  [5:] path

``progress`` = 8 * sent + inflight, written as one word (a single store, so a
kill never leaves half of it): ``sent`` messages for the item are known to be
committed, and ``inflight`` says which put, if any, was started and may or may
not have been committed when the worker died:

  F_NONE    nothing being put;
  F_PART    generator output `sent`, not its last (share e+sent+1);
  F_LAST    the generator's last output `sent` (share e+sent: all that is left);
  F_FUNC    a function's one output (share e, same path);
  F_END     a K_DONE / K_ERROR message to the parent (share e+sent, same path);
  F_COMPLETE  the node's last message (F_LAST, F_FUNC or F_END) was committed:
            nothing of it remains.

Which it was is decided by evidence: anything that reached the parent below
that put's node proves it was committed. Without evidence the remaining share
is failed with WorkerLost and the node is *voided*: anything arriving for it
later is dropped (counted), so every share is counted exactly once.

Invariants (between two calls):
  * every seq in [0, next_seq) was admitted once; it is outstanding until its
    shares add up to 1, then counted in ncomplete, and never again;
  * a message for a seq not outstanding, or below a voided node, is dropped;
  * ordered: results of seqs < emit_seq have been moved to the ready list; a
    finished seq >= emit_seq waits in _complete with its results held;
    next_seq - emit_seq <= max_inflight bounds both;
  * unordered: next_seq - ncomplete <= max_inflight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from shmipc._slots import BUSY, DONE, READY, STARTING

__all__ = ["Scheduler", "SlotRecord", "StageFailure", "StageRule", "Raise", "SLOT_WORDS",
           "MAX_PATH", "S_STARTING", "S_READY", "S_BUSY", "S_DONE",
           "F_NONE", "F_PART", "F_LAST", "F_FUNC", "F_END", "F_COMPLETE", "progress_word",
           "is_envelope", "output_problem", "MAX_CREDIT"]

# the states of the slot table every worker runtime shares (shmipc._slots)
S_STARTING, S_READY, S_BUSY, S_DONE = STARTING, READY, BUSY, DONE
F_NONE, F_PART, F_LAST, F_FUNC, F_END, F_COMPLETE = 0, 1, 2, 3, 4, 5
SLOT_WORDS = 32
MAX_PATH = SLOT_WORDS - 5
# An item's share travels as an exponent e (2**-e of the item): each output of
# a generator stage takes one more. Credits are summed as exact fractions
# (_add_credit), in ints of e bits; a credit above this, read from shared
# memory, is forged or damaged (one item would need more than 64 M outputs,
# which that arithmetic could not sum in reasonable time anyway), and taken
# as it is it would make a shift allocate up to 2**e bits.
MAX_CREDIT = 1 << 26


def progress_word(sent: int, inflight: int) -> int:
    return sent * 8 + inflight


def is_envelope(env: Any) -> bool:
    """`env` (decoded from shared memory: untrusted) has an item envelope's
    shape: (seq, credit, path, data, meta) with a path of ints."""
    return (type(env) is tuple and len(env) == 5 and type(env[0]) is int and env[0] >= 0
            and type(env[1]) is int and 0 <= env[1] <= MAX_CREDIT and type(env[2]) is tuple
            and len(env[2]) <= MAX_PATH and all(type(x) is int and x >= 0 for x in env[2]))


# the kinds of message stage workers send to the parent (shmipc._wire)
_OUTPUT_KINDS = (0, 1, 2, 3)            # K_RESULT, K_DONE, K_ERROR, K_FATAL
_ERROR_KINDS = (2, 3)
_FATAL = 3


def output_problem(msg: Any) -> str | None:
    """Why `msg`, read from the parent's output ring (untrusted), is not a
    well-formed ``(kind, seq, credit, path, data, meta)`` message (None: it
    is). An error's data must be ``(stage index, pickled exception or None,
    text, traceback)``."""
    if type(msg) is not tuple or len(msg) != 6:
        length = f" of length {len(msg)}" if type(msg) is tuple else ""
        return f"an output message is {type(msg).__name__}{length}, not a tuple of 6"
    kind, seq, credit, path, data, _meta = msg
    if type(kind) is not int or kind not in _OUTPUT_KINDS:
        return f"an output message's kind is {kind!r:.40}"
    if type(seq) is not int or seq < (-1 if kind == _FATAL else 0):     # (a setup failure names no item: -1)
        return f"an output message's item number is {seq!r:.40}"
    if type(credit) is not int or not 0 <= credit <= MAX_CREDIT:
        return f"item {seq}'s output message has credit {credit!r:.40} (0 to {MAX_CREDIT})"
    if (type(path) is not tuple or len(path) > MAX_PATH
            or not all(type(x) is int and x >= 0 for x in path)):
        return f"item {seq}'s output message has path {path!r:.60}"
    if kind in _ERROR_KINDS and not (
            type(data) is tuple and len(data) == 4 and type(data[0]) is int
            and type(data[1]) in (bytes, type(None)) and type(data[2]) is str and type(data[3]) is str):
        return f"item {seq}'s error message carries {type(data).__name__}, not (stage, exception, text, traceback)"
    return None


@dataclass(frozen=True)
class SlotRecord:
    """A worker's slot, decoded (see the module docstring)."""

    state: int
    seq: int
    credit: int
    sent: int
    inflight: int
    path: tuple

    @classmethod
    def from_words(cls, words: Any) -> "SlotRecord | None":
        """Decode a slot row read from shared memory (untrusted): None if
        its fields are out of range."""
        state, seq, credit, progress, npath = (int(w) for w in words[:5])
        if state not in (S_STARTING, S_READY, S_BUSY, S_DONE) or not 0 <= npath <= MAX_PATH:
            return None
        if state == S_BUSY and (seq < 0 or not 0 <= credit <= MAX_CREDIT or progress < 0
                                or progress % 8 > F_COMPLETE):
            return None
        path = tuple(int(w) for w in words[5:5 + npath])
        return cls(state, seq, credit, progress // 8, progress % 8, path)


@dataclass
class StageFailure:
    """One failed item, as kept in ``Pipeline.errors`` with on_error="collect".

    ``seq`` is the item's position in the source; ``exception`` has the
    worker's traceback as ``__cause__`` (a RemoteTraceback), also in
    ``traceback`` as text.
    """

    stage: str
    seq: int
    exception: BaseException
    traceback: str


@dataclass(frozen=True)
class StageRule:
    """What the scheduler needs to know of a stage."""

    name: str
    on_error: str       # "raise", "skip" or "collect"
    retries: int


class Raise:
    """A failure waiting in the ready list for its turn to be raised."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Scheduler:
    """The parent's bookkeeping of one pipeline run (see the module docstring).

    Args:
        stages: one StageRule per stage.
        ordered: results leave in source order (else in completion order).
        max_inflight: most items admitted and not yet yielded.
        errors: the list failures go to under on_error="collect".
    """

    def __init__(self, stages: list[StageRule], ordered: bool, max_inflight: int,
                 errors: list[StageFailure]) -> None:
        self.stages = stages
        self.ordered = ordered
        self.max_inflight = max_inflight
        self.errors = errors
        self.next_seq = 0                     # next seq to admit
        self.emit_seq = 0                     # next seq to yield (ordered)
        self.ncomplete = 0                    # items finished
        self.exhausted = False                # the source ended (set by the caller)
        self.dropped = 0                      # late messages (settled or voided items)
        self.retried = 0                      # items handed back for another try
        self.lost = 0                         # shares failed with WorkerLost
        self.ready: list[Any] = []            # results (and Raise) to yield, in order
        self._outstanding: set[int] = set()   # admitted, not finished
        self._partial: dict[int, tuple[int, int]] = {}   # seq -> (numerator, exponent) of credit
        self._held: dict[int, list[tuple[tuple, Any]]] = {}   # seq -> [(path, value)] (ordered)
        self._failed: dict[int, BaseException] = {}   # seq -> exception to raise (ordered)
        self._complete: set[int] = set()      # finished seqs not yet yielded (ordered)
        self._seen: dict[int, list[tuple]] = {}       # seq -> paths arrived or settled (partial items)
        self._voids: dict[int, list[tuple[tuple, bool]]] = {}  # seq -> [(path, is_prefix)]
        self._attempts: dict[tuple, int] = {}  # (stage, seq, path) -> tries so far

    # ------------------------------------------------------------ feeding
    def can_admit(self) -> bool:
        """True if one more item may enter (max_inflight)."""
        # ordered: finished items wait in the reorder buffer until they are
        # yielded, so they count as inside the pipeline until then
        done = self.emit_seq if self.ordered else self.ncomplete
        return self.next_seq - done < self.max_inflight

    def admit(self) -> int:
        """A source item enters; returns its seq."""
        seq = self.next_seq
        self._outstanding.add(seq)
        self.next_seq = seq + 1
        return seq

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def is_outstanding(self, seq: int) -> bool:
        return seq in self._outstanding

    @property
    def finished(self) -> bool:
        """The source ended, every item finished and every result was taken."""
        return self.exhausted and self.next_seq == self.ncomplete and not self.ready

    def take_ready(self) -> list[Any]:
        """The results (and Raise markers) ready to leave, in order."""
        items = self.ready
        self.ready = []
        return items

    # ------------------------------------------------------------ arrivals
    def result(self, seq: int, credit: int, path: tuple, value: Any) -> bool:
        """A result arrived; False if it was dropped as late."""
        if credit == 0 and seq in self._outstanding and seq not in self._voids:
            # the common case: the item's one and only message
            self._outstanding.discard(seq)
            self.ncomplete += 1
            if not self.ordered:
                self.ready.append(value)
            elif seq == self.emit_seq:
                self.ready.append(value)
                self.emit_seq = seq + 1
                if self._complete:
                    self._flush()
            else:
                self._held[seq] = [(path, value)]
                self._complete.add(seq)
            return True
        if not self._accept(seq, path):
            return False
        if self.ordered:
            self._held.setdefault(seq, []).append((path, value))
        else:
            self.ready.append(value)
        self._add_credit(seq, credit)
        return True

    def done(self, seq: int, credit: int, path: tuple) -> bool:
        """An input that yielded nothing returned its share."""
        if not self._accept(seq, path):
            return False
        self._add_credit(seq, credit)
        return True

    def error(self, stage: int, seq: int, credit: int, path: tuple, exc: BaseException,
              tb: str = "") -> bool:
        """A share of item `seq` failed with `exc` (handled by the stage's on_error)."""
        if not self._accept(seq, path):
            return False
        self._fail(stage, seq, exc, tb)
        self._add_credit(seq, credit)
        return True

    def _accept(self, seq: int, path: tuple) -> bool:
        if seq not in self._outstanding:
            self.dropped += 1             # late: the item was settled already
            return False
        voids = self._voids.get(seq)
        if voids is not None and any(_covers(v, prefix, path) for v, prefix in voids):
            self.dropped += 1             # below a node failed as lost
            return False
        self._seen.setdefault(seq, []).append(path)
        return True

    def _fail(self, stage: int, seq: int, exc: BaseException, tb: str) -> None:
        rule = self.stages[stage]
        if rule.on_error == "raise":
            if self.ordered:
                self._failed.setdefault(seq, exc)
            else:
                self.ready.append(Raise(exc))
        elif rule.on_error == "collect":
            self.errors.append(StageFailure(rule.name, seq, exc, tb))

    def _add_credit(self, seq: int, e: int) -> None:
        """Count 2**-e of item `seq` as arrived; finish the item at 1."""
        if e == 0 and seq not in self._partial:
            self._finish(seq)
            return
        num, den = self._partial.get(seq, (0, 0))
        if e > den:
            num <<= e - den
            den = e
        num += 1 << (den - e)
        if num >= 1 << den:
            self._finish(seq)
        else:
            self._partial[seq] = (num, den)

    def _finish(self, seq: int) -> None:
        self._outstanding.discard(seq)
        self._partial.pop(seq, None)
        self._seen.pop(seq, None)
        self._voids.pop(seq, None)
        self.ncomplete += 1
        if self._attempts:                    # only items that were retried
            for key in [k for k in self._attempts if k[1] == seq]:
                del self._attempts[key]
        if not self.ordered:
            return
        self._complete.add(seq)
        self._flush()

    def _flush(self) -> None:
        """Ordered: move the results of finished items at the head to ready."""
        while self.emit_seq in self._complete:
            s = self.emit_seq
            self._complete.discard(s)
            held = self._held.pop(s, None)
            if held:
                if len(held) > 1:
                    held.sort(key=_path_key)
                self.ready.extend(v for _, v in held)
            exc = self._failed.pop(s, None)
            if exc is not None:
                self.ready.append(Raise(exc))
            self.emit_seq = s + 1

    # ------------------------------------------------------------ losses
    def worker_lost(self, stage: int, rec: SlotRecord | None, stashed: tuple | None,
                    lost: Callable[[int], BaseException]) -> tuple | None:
        """A worker of `stage` died; `rec` is its slot, `stashed` the copy of
        its input it kept (retries only), `lost(seq)` makes the WorkerLost.
        Settles what it held; returns an envelope to put back into the
        stage's ring (a retry), or None."""
        if rec is None:
            return None
        state, seq, credit, sent, inflight, path = (rec.state, rec.seq, rec.credit, rec.sent,
                                                    rec.inflight, rec.path)
        if state == S_READY and stashed is not None:
            # died between keeping its copy and marking itself busy: not started
            seq, credit, path = stashed[0], stashed[1], tuple(stashed[2])
            state, sent, inflight = S_BUSY, 0, F_NONE
        if state != S_BUSY or inflight == F_COMPLETE or seq not in self._outstanding:
            return None
        voids = self._voids.get(seq)
        if voids is not None and any(prefix and _covers(v, True, path) for v, prefix in voids):
            return None                   # an ancestor's loss already settled this node's share
        void: tuple[tuple, bool] | None = None
        if inflight != F_NONE:
            node, prefix = _inflight_node(path, sent, inflight)
            if any(_covers(node, prefix, p) for p in self._seen.get(seq, ())):
                # committed: it reached the parent (or a later stage's worker)
                if inflight != F_PART:
                    return None           # that was the node's last message
                sent += 1
            else:
                void = (node, prefix)
        if inflight == F_NONE and sent == 0 and stashed is not None:
            key = (stage, seq, path)
            tries = self._attempts.get(key, 0) + 1
            if tries <= self.stages[stage].retries:
                self._attempts[key] = tries
                self.retried += 1
                return stashed
        # fail what is left: the in-flight message's share and all after it
        if void is not None:
            self._voids.setdefault(seq, []).append(void)
        self._seen.setdefault(seq, []).append(path + (sent,) if inflight in (F_PART, F_LAST) else path)
        self.lost += 1
        self._fail(stage, seq, lost(seq), "")
        self._add_credit(seq, credit + sent)
        return None

    def fail_item(self, stage: int, seq: int, exc: BaseException) -> bool:
        """Fail all of item `seq` with `exc` under `stage`'s on_error (a
        message for it arrived damaged: what is left of its share cannot be
        told). False if it was settled already."""
        if seq not in self._outstanding:
            self.dropped += 1
            return False
        self._fail(stage, seq, exc, "")
        self._finish(seq)
        return True

    def fail_outstanding(self, lost: Callable[[int], BaseException]) -> list[int]:
        """Fail every unfinished item (lost without a trace: see
        Pipeline._settle_stuck), under the first stage's on_error. Returns
        their seqs."""
        seqs = sorted(self._outstanding)
        for seq in seqs:
            self.lost += 1
            self._fail(0, seq, lost(seq), "")
            self._finish(seq)
        return seqs


def _inflight_node(path: tuple, sent: int, inflight: int) -> tuple[tuple, bool]:
    """The node an in-flight put was for, and whether everything below it
    descends from that put (prefix) or only that exact message."""
    if inflight in (F_PART, F_LAST):
        return path + (sent,), True
    if inflight == F_FUNC:
        return path, True
    return path, False                    # F_END: the K_DONE/K_ERROR itself


def _covers(node: tuple, prefix: bool, path: tuple) -> bool:
    if prefix:
        return path[:len(node)] == node
    return path == node


def _path_key(pair: tuple) -> tuple:
    return pair[0]
