"""Cross-process coordination that never waits forever: barriers and all-gathers with timeouts.

Every wait across processes in training goes through this module.  With one process every call
returns at once (nothing to wait for).  With several (after `init_distributed`), the waits use the
key-value store and barriers of the `jax.distributed` coordination service, each with a timeout:
a process that does not arrive in time raises `CrossProcessTimeout` naming the wait, the processes
that are missing and what to check -- never a hang, never a silent mismatch.

* `init_distributed(...)` -- `jax.distributed.initialize` with CPU collectives over gloo, a
  heartbeat timeout (a dead process is noticed by the others within it), and orbax switched to
  the same timed barriers (its default barriers are all-gathers without a timeout).
* `barrier(name, timeout_s)` -- every process reaches `name` (or `CrossProcessTimeout`).
* `all_gather_json(name, value, timeout_s)` -- every process contributes a JSON value and gets the
  list of all of them, in process order.  Used to agree on decisions (which checkpoint is good).

Names: every process must call the same sequence of waits with the same names; a per-name counter
makes repeated waits of one name distinct.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax

__all__ = ["CrossProcessTimeout", "DEFAULT_TIMEOUT_S", "init_distributed", "barrier", "all_gather_json",
           "is_multiprocess"]

#: Default seconds any cross-process wait may take (checkpoint restores of big models included).
DEFAULT_TIMEOUT_S = 900.0
#: Default heartbeat timeout: a process that stops sending heartbeats for this long is declared dead
#: and every other process is stopped (with the one lost-peer line: train/peerwatch.py), so a lost peer
#: ends the run within a minute.  Heartbeats come from the runtime's own thread, so long compiles and
#: saves do not miss them; raise it (--heartbeat-timeout) on networks with long stalls.
DEFAULT_HEARTBEAT_S = 45

_counters: dict[str, int] = {}


class CrossProcessTimeout(TimeoutError):
    """A wait across processes ran out of time (the message names the wait and who is missing)."""


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S,
                     initialization_timeout_s: int = 300, **kw) -> None:
    """`jax.distributed.initialize` with CPU collectives over gloo (needed for multi-process CPU
    runs, harmless on GPU/TPU) and the heartbeat timeout after which a dead process stops the others
    (with a message naming it).  No-op for a single process without a coordinator, unless
    ``auto_detect=True`` (TPU pods, SLURM: JAX finds the coordinator and the processes itself).  Also makes
    orbax's checkpoint barriers timed (`use_timed_orbax_barriers`)."""
    auto = kw.pop("auto_detect", False)
    if coordinator_address is None and num_processes in (None, 1) and not auto:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                               initialization_timeout=int(initialization_timeout_s), **kw)
    use_timed_orbax_barriers()


def use_timed_orbax_barriers() -> None:
    """Make orbax use the coordination service's barriers (which time out, after orbax's 300 s)
    instead of all-gather barriers (which wait forever and report a name mismatch as an
    AssertionError).  The switch is orbax's own absl flag; setting it is idempotent."""
    try:
        from absl import flags
        import orbax.checkpoint  # noqa: F401  (defines the flag)
        flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    except (ImportError, KeyError):  # an orbax without the flag: keep its default barriers
        return
    flag.value = True
    flag.present = 1  # readable before absl parses the command line


def _client():
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(f"{jax.process_count()} processes but no jax.distributed client: call "
                           "pldr_jax.train.init_distributed(...) on every process first")
    return client


def _key(name: str) -> str:
    n = _counters.get(name, 0)
    _counters[name] = n + 1
    return f"pldr/{name}/{n}"


def _timeout_message(name: str, timeout_s: float, missing: list[int] | None, err: Exception | None) -> str:
    who = f"process(es) {missing} did not arrive" if missing else "not every process arrived"
    detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err is not None else ""
    return (f"process {jax.process_index()} of {jax.process_count()} waited {timeout_s:.0f} s at {name!r}: {who}"
            f"{detail}. Another process probably died, hangs, or runs a different program or configuration; "
            "check its log. Nothing was changed on disk by this wait.")


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Block until every process has called `barrier(name)` (no-op with one process)."""
    if not is_multiprocess():
        return
    key = _key(name)
    try:
        _client().wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:  # the client raises XlaRuntimeError(DEADLINE_EXCEEDED / barrier errors)
        raise CrossProcessTimeout(_timeout_message(name, timeout_s, None, e)) from None


def all_gather_json(name: str, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Every process's JSON-serialisable `value`, in process order (``[value]`` with one process)."""
    if not is_multiprocess():
        return [json.loads(json.dumps(value))]
    client = _client()
    key = _key(name)
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    deadline = time.monotonic() + timeout_s
    out: list = []
    for p in range(jax.process_count()):
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            out.append(json.loads(client.blocking_key_value_get(f"{key}/{p}", left_ms)))
        except Exception as e:
            missing = [q for q in range(p, jax.process_count())
                       if _try_get(client, f"{key}/{q}") is None]
            raise CrossProcessTimeout(_timeout_message(name, timeout_s, missing, e)) from None
    return out


def _try_get(client, key: str):
    try:
        return client.key_value_try_get(key)
    except Exception:
        return None
