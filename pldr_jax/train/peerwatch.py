"""A lost peer ends a multi-process run with one line, also when the JAX runtime aborts the process.

When a process of a multi-process run dies, the JAX coordination service tells the others, and its
client in every survivor ends that process from a C++ thread: ``LOG(FATAL) << "Terminating process
because the JAX distributed service detected fatal errors ..."``, a C++ stack trace, SIGABRT.  It
does so at once when process 0 (which hosts the service) died, after ``--heartbeat-timeout`` when
another one did -- whatever the survivor's Python thread is doing (waiting in orbax's commit barrier,
in a key-value wait, or in a collective that has not failed yet).  A survivor whose Gloo collective
fails first reports the loss itself (`faults.peer_failure_message`, printed by `pldr_jax.cli`).

The client's ``missed_heartbeat_callback`` would be the place for our message, but `jax.distributed`
does not pass one, and jaxlib 0.10's binding of it (``std::function<void(absl::Status)>``) cannot hand
the status to a Python callable: the call ends in ``std::terminate`` (``std::bad_cast``) instead.  After
the abort no Python code of the process runs, so the line comes from a small watcher process:

* `start(command, ckpt_dir)`, in a training process after `jax.distributed.initialize`, starts this
  file as a script (standard library only, no JAX) reading a pipe; the process's file descriptor 2
  (where the C++ runtime writes) becomes that pipe, while Python's `sys.stderr` keeps the original
  stream (a terminal stays a terminal).
* The watcher copies what arrives to the original stderr, line by line, with one exception: from the
  coordination service's error lines on (`ERROR_MARKERS`), lines are held back.  When the fatal line
  (`FATAL_MARKER`) follows, the held lines, the fatal line and the stack trace after it are replaced by
  one line -- ``pldr-jax train: error: another process of this run died or became unreachable (<the
  service's status>); the newest complete checkpoint is step K in DIR. Start every process again with
  the same command plus --resume`` -- printed before the process is gone.  Held lines without a
  fatal line within `HOLD_S` seconds are released unchanged.  Nothing else is touched: any other
  abort (a bug) prints its message and stack as before.
* The process's own final error line goes through the watcher too (`report`: written into the pipe,
  printed by the watcher, acknowledged before the process exits), so that exactly one line comes out
  when a collective's failure and the runtime's abort race (a killed process 0 causes both at once):
  whichever reaches the watcher first is printed, the other dropped.  `reported` (after a traceback)
  only tells the watcher to add nothing.

The process itself still ends with SIGABRT (exit status 134 in a shell, -6 from `subprocess`).
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["start", "report", "reported", "is_running", "complete_checkpoint_steps", "lost_peer_message", "LineFilter",
           "ERROR_MARKERS", "FATAL_MARKER", "HOLD_S"]

#: The line the JAX distributed client logs (LOG(FATAL)) right before it aborts the process.
FATAL_MARKER = b"Terminating process because the JAX distributed service detected fatal errors"
#: Lines the coordination service and its agent log on the way to that abort (held back).
ERROR_MARKERS = (b"Use error polling to propagate the following error to all tasks",
                 b"Polled an error from coordination service",
                 b"Coordination service agent in error status")
#: Seconds held lines wait for the fatal line before they are released unchanged.
HOLD_S = 5.0
#: Seconds `report` waits for the watcher to print the process's line (else the process prints it).
ACK_S = 2.0
#: What `reported` writes into the pipe (never printed): the process printed its final error itself.
_REPORTED = b"\x1e[pldr-jax reported]\x1e\n"
#: The prefix of the process's own final line written into the pipe by `report` (printed without it).
_LINE = b"\x1e[pldr-jax line]\x1e"

_state: dict = {}  # the running watcher of this process: {"proc": Popen, "fd": the pipe's write end, "ack": fd}


# =========================================================================== the message
def complete_checkpoint_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps whose checkpoint save finished (orbax writes ``_CHECKPOINT_METADATA`` last; a save cut off
    leaves an ``*.orbax-checkpoint-tmp-*`` folder or a step folder without it)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def lost_peer_message(what: str, ckpt_dir: str | os.PathLike) -> str:
    """One line for a run stopped by a lost peer: `what` failed (one line of the library's error),
    the newest complete checkpoint in `ckpt_dir`, and how to go on."""
    what = " ".join(what.split()) or "no detail"
    if len(what) > 200:  # whole sentences where they fit, else cut
        cut = what[:200].rfind(". ")
        what = what[:cut + 1] if cut >= 60 else what[:197] + "..."
    steps = complete_checkpoint_steps(ckpt_dir)
    kept = (f"the newest complete checkpoint is step {steps[-1]} in {ckpt_dir}" if steps else
            f"no complete checkpoint exists yet in {ckpt_dir}")
    return (f"another process of this run died or became unreachable ({what}); {kept}. Start every process again "
            f"with the same command plus --resume" + (" (it continues from that step)" if steps else ""))


def _status_summary(lines: list[bytes]) -> str:
    """The coordination service's status in held lines + the fatal line: its first line (and the
    next one when the first ends with a colon: the tasks that stopped sending heartbeats)."""
    text = b"".join(lines).decode("utf-8", "replace").splitlines()
    for key in ("Status: ", "error to all tasks: "):
        for i in range(len(text) - 1, -1, -1):
            if key in text[i]:
                first = text[i].split(key, 1)[1].strip()
                if first.endswith(":"):
                    more = next((t.strip() for t in text[i + 1:i + 2] if t.strip()), None)
                    if more is None:  # the fatal line's status continues in lines not read yet: take the service's
                        continue
                    first = f"{first} {more}"
                return f"JAX coordination service: {first}"
    return "the JAX coordination service reported a fatal error"


# =========================================================================== the watcher's filter
class LineFilter:
    """The watcher's decisions, one line at a time (no I/O, so it can be tested without processes).
    ``feed(line)`` and ``timeout()`` / ``eof()`` return the bytes to write to the original stderr;
    ``deadline`` is when held lines are released (None: nothing held)."""

    def __init__(self, command: str, ckpt_dir: str | os.PathLike, hold_s: float = HOLD_S, clock=time.monotonic):
        self.command, self.ckpt_dir, self.hold_s, self.clock = command, ckpt_dir, hold_s, clock
        self.held: list[bytes] = []
        self.deadline: float | None = None
        self.reported = False  # the process printed its final error line itself
        self.fatal = False     # the runtime's fatal line was seen: the rest is its stack trace
        self.ack = False       # the process waits to hear that its line was handled (`report`)

    def feed(self, line: bytes) -> bytes:
        if line == _REPORTED:
            self.reported = True
            return b""
        if line.startswith(_LINE):  # the process's own final line: printed unless the abort's line was
            self.ack = True
            done, self.reported = self.fatal or self.reported, True
            return b"" if done else line[len(_LINE):].replace(b"\x1f", b"\n")
        if self.fatal:
            return b""
        if FATAL_MARKER in line:
            self.fatal = True
            held, self.held, self.deadline = self.held + [line], [], None
            if self.reported:
                return b""
            msg = lost_peer_message(_status_summary(held), self.ckpt_dir)
            return f"{self.command}: error: {msg}\n".encode()
        if self.held or any(m in line for m in ERROR_MARKERS):
            if not self.held:
                self.deadline = self.clock() + self.hold_s
            self.held.append(line)
            return b""
        return line

    def timeout(self) -> bytes:
        """Held lines whose fatal line did not come in time: released as they were."""
        if self.deadline is None or self.clock() < self.deadline:
            return b""
        out, self.held, self.deadline = b"".join(self.held), [], None
        return out

    def eof(self) -> bytes:
        """The process ended (every copy of the pipe's write end is closed): held lines are dropped
        when the process reported its end itself, else released."""
        out = b"" if self.reported or self.fatal else b"".join(self.held)
        self.held, self.deadline = [], None
        return out


def _watch(command: str, ckpt_dir: str, hold_s: float, ack: int, inp: int = 0, out: int = 1) -> int:
    """The watcher's loop: `inp` (the pipe) through `LineFilter` to `out` until end of file; a byte
    to `ack` once the process's own line is handled."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C / scheduler signal to the group: outlive the process
        signal.signal(sig, signal.SIG_IGN)
    filt, partial = LineFilter(command, ckpt_dir, hold_s), b""

    def write(data: bytes) -> None:
        while data:
            try:
                data = data[os.write(out, data):]
            except InterruptedError:
                continue
            except OSError:  # the original stderr is gone: nothing left to show
                return

    while True:
        wait = None if filt.deadline is None else max(0.0, filt.deadline - time.monotonic())
        if not select.select([inp], [], [], wait)[0]:
            write(filt.timeout())
            continue
        try:
            chunk = os.read(inp, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        *lines, partial = (partial + chunk).split(b"\n")
        write(b"".join(filt.feed(line + b"\n") for line in lines))
        if filt.ack:
            filt.ack = False
            try:
                os.write(ack, b"!")
            except OSError:  # the process is gone
                pass
    write(filt.feed(partial) if partial else b"")
    write(filt.eof())
    return 0


# =========================================================================== in the training process
def start(command: str, ckpt_dir: str | os.PathLike, hold_s: float = HOLD_S) -> bool:
    """Start the watcher for this process (idempotent; see the module docstring).  `command`: the
    prefix of the line (``"pldr-jax train"``); `ckpt_dir`: where the checkpoints to resume from are.
    Returns whether it runs (False where a pipe or a process cannot be made: nothing changed)."""
    if _state:
        return True
    if not sys.executable:  # an embedded interpreter: no script can be started
        return False
    sys.stderr.flush()
    try:
        orig = os.dup(2)
    except OSError:
        return False
    fds = [orig]
    try:
        r, w = os.pipe()
        fds += [r, w]
        ack_r, ack_w = os.pipe()
        fds += [ack_r, ack_w]
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(Path(__file__).resolve()), command,
                                 str(Path(ckpt_dir).absolute()), repr(float(hold_s)), str(ack_w)],
                                stdin=r, stdout=orig, stderr=orig, close_fds=True, pass_fds=(ack_w,))
    except OSError:
        for fd in fds:
            os.close(fd)
        return False
    os.close(r)
    os.close(ack_w)
    sys.stderr = io.TextIOWrapper(open(orig, "wb"), encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                  errors="backslashreplace", line_buffering=True,
                                  write_through=getattr(sys.stderr, "write_through", False))
    os.dup2(w, 2)
    os.close(w)
    _state.update(proc=proc, fd=2, ack=ack_r)
    return True


def is_running() -> bool:
    return bool(_state)


def report(line: str) -> bool:
    """Have the watcher print the process's final error `line` -- or drop it, when it
    already printed the lost-peer line for an abort of the runtime -- and wait until it did (at most
    `ACK_S` s).  False (nothing printed: print it yourself) without a watcher or an answer."""
    if not _state:
        return False
    try:
        text = line.rstrip("\n").replace("\n", "\x1f")  # one line in the pipe; its line breaks restored there
        os.write(_state["fd"], _LINE + text.encode("utf-8", "backslashreplace") + b"\n")
        if select.select([_state["ack"]], [], [], ACK_S)[0] and os.read(_state["ack"], 1):
            return True
    except OSError:
        pass
    return False


def reported() -> None:
    """The process printed its final error (a traceback) itself and exits now: the watcher adds
    nothing and drops the coordination service's lines it holds.  No-op without a watcher."""
    if not _state:
        return
    try:
        os.write(_state["fd"], _REPORTED)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(_watch(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
