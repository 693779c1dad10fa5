"""Failpoints: named places where a test can freeze the process dead, to kill it exactly there.

``KEYWARD_FAILPOINTS`` (comma-separated names, read once when this module is first imported)
arms points for this process. At an armed point the process sends itself SIGSTOP: it stops
with every socket open, no reply sent and nothing more written, and the fault campaign
(tests/chaos) SIGKILLs it once it sees it stopped. That is the only action; an unarmed point
costs one test of an empty set. (The idea of etcd's gofail and FreeBSD's fail(9), reduced to
what the campaign needs: a crash at a chosen instant instead of a crash at a random one.)

A name arms itself and every point below it: ``ca.reply`` arms ``ca.reply.UpdatePolicy``.

The points:

* ``ca.reply.<Method>``: a CA call's handler has returned (its transaction committed) and its
  reply is not yet sent (``control_plane.calls``);
* ``dbops.failover.fenced``, ``.promoted``, ``.configured``, ``.repointed``: between the steps
  of a failover (``dbops.failover.execute``), to kill the watch agent in the middle of one.
"""

from __future__ import annotations

import logging
import os
import signal

ARMED: frozenset[str] = frozenset(n.strip() for n in os.environ.get("KEYWARD_FAILPOINTS", "").split(",")
                                  if n.strip())
"""The armed names (empty in production: the variable is for the fault campaign)."""

log = logging.getLogger("keyward.failpoints")


def armed(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ARMED)


def point(name: str) -> None:
    """Stop this process here when ``name`` is armed (see the module's docstring)."""
    if ARMED and armed(name):
        log.warning("failpoint %s reached: stopping (SIGSTOP)", name)
        for h in logging.getLogger().handlers:  # said before the stop, not never
            h.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
