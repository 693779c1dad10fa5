"""Operations on keyward's Postgres cluster: status, failover, rejoin,
backup, restore. Used by ``keyward db ...`` and by the Kubernetes operator.

The cluster is one primary streaming to two hot standbys, each with its own
physical replication slot; ``synchronous_standby_names = 'ANY <k> (...)'``
names the other nodes and ``synchronous_commit = remote_apply``, so with
k = 2 (the default) a commit is acknowledged only once both standbys have
flushed and applied it: every acknowledged write is on three servers and
visible on each. k = 1 trades this for availability with one standby.

This package never imports the control plane.
"""
