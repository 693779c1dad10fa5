"""What each server of the cluster is doing, over SQL only."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict

from dbops.spec import ClusterSpec, Node


@dataclass
class ReplicaLink:
    name: str
    state: str
    sync_state: str
    replay_lag_s: float | None
    flush_lsn: str


@dataclass
class NodeStatus:
    node: Node
    reachable: bool
    error: str = ""
    role: str = ""  # primary | standby
    timeline: int = 0
    lsn: str = ""  # primary: current WAL LSN; standby: last received
    lsn_int: int = 0
    replay_lsn: str = ""
    upstream: str = ""  # standby: host:port it streams from
    source: str = ""
    """standby: host:port its primary_conninfo names (what it streams from, or keeps trying to)."""
    streaming: bool = False
    sync_names: str = ""
    replicas: list[ReplicaLink] = field(default_factory=list)


def _lsn_int(lsn: str | None) -> int:
    if not lsn:
        return 0
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def _host_port(conninfo: str) -> str:
    try:
        d = conninfo_to_dict(conninfo) if conninfo else {}
    except psycopg.ProgrammingError:
        return ""
    return f"{d['host']}:{d.get('port', 5432)}" if d.get("host") else ""


def node_status(spec: ClusterSpec, node: Node, timeout: int = 2) -> NodeStatus:
    try:
        with psycopg.connect(spec.conninfo(node, dbname="postgres", timeout=timeout), autocommit=True) as c:
            c.execute(f"SET statement_timeout = '{timeout}s'")
            in_rec = c.execute("SELECT pg_is_in_recovery()").fetchone()
            assert in_rec is not None
            st = NodeStatus(node, True, role="standby" if in_rec[0] else "primary")
            if in_rec[0]:
                r = c.execute("SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text").fetchone()
                assert r is not None
                st.lsn, st.replay_lsn = r[0] or r[1] or "", r[1] or ""
                w = c.execute("SELECT status, sender_host, sender_port, received_tli FROM pg_stat_wal_receiver").fetchone()
                if w:
                    st.streaming = w[0] == "streaming"
                    st.upstream = f"{w[1]}:{w[2]}"
                    st.timeline = int(w[3] or 0)
                st.lsn_int = max(_lsn_int(st.lsn), _lsn_int(st.replay_lsn))
                ci = c.execute("SELECT current_setting('primary_conninfo')").fetchone()
                st.source = _host_port(ci[0] if ci else "")
            else:
                r = c.execute("SELECT pg_current_wal_lsn()::text, timeline_id FROM pg_control_checkpoint()").fetchone()
                assert r is not None
                st.lsn, st.timeline = r[0], int(r[1])
                st.lsn_int = _lsn_int(st.lsn)
                s = c.execute("SHOW synchronous_standby_names").fetchone()
                st.sync_names = s[0] if s else ""
                for a in c.execute("SELECT application_name, state, sync_state, "
                                   "extract(epoch from replay_lag)::float8, flush_lsn::text FROM pg_stat_replication"):
                    st.replicas.append(ReplicaLink(a[0], a[1], a[2], a[3], a[4] or ""))
            return st
    except (psycopg.Error, OSError) as e:
        return NodeStatus(node, False, error=(str(e).strip().splitlines() or ["unreachable"])[0][:200])


def cluster_status(spec: ClusterSpec) -> list[NodeStatus]:
    return [node_status(spec, n) for n in spec.nodes]


def problems(spec: ClusterSpec, sts: list[NodeStatus]) -> list[str]:
    """Plain-language problems an operator must see."""
    out: list[str] = []
    primaries = [s for s in sts if s.reachable and s.role == "primary"]
    if not primaries:
        out.append("no primary reachable: writes fail (UNAVAILABLE); run `keyward db failover`")
    if len(primaries) > 1:
        out.append("SPLIT BRAIN: " + " and ".join(s.node.name for s in primaries)
                   + " both accept connections as primary; fence one now")
    for s in sts:
        if not s.reachable:
            out.append(f"{s.node.name} is down: {s.error}")
    if len(primaries) == 1:
        p = primaries[0]
        links = {r.name: r for r in p.replicas}
        for s in sts:
            if s is p or not s.reachable:
                continue
            link = links.get(s.node.name)
            if link is None or link.state != "streaming":
                out.append(f"{s.node.name} is not streaming from primary {p.node.name}")
            elif link.sync_state not in ("sync", "quorum"):
                out.append(f"{s.node.name} streams but is not synchronous ({link.sync_state})")
            elif link.replay_lag_s and link.replay_lag_s > 5:
                out.append(f"{s.node.name} lags {link.replay_lag_s:.1f}s behind")
        sync = sum(1 for r in p.replicas if r.state == "streaming" and r.sync_state in ("sync", "quorum"))
        if sync < spec.required_sync:
            out.append(f"only {sync} synchronous standby(s) of {spec.required_sync} required: writes wait "
                       "and fail at their deadline until a standby is back")
    return out


def render(spec: ClusterSpec, sts: list[NodeStatus]) -> str:
    lines = [f"{'node':6} {'addr':22} {'role':8} {'tl':>3} {'lsn':>14}  detail"]
    for s in sts:
        addr = f"{s.node.host}:{s.node.port}"
        if not s.reachable:
            lines.append(f"{s.node.name:6} {addr:22} {'DOWN':8} {'':>3} {'':>14}  {s.error}")
            continue
        detail = (f"sync: {s.sync_names}; " + ", ".join(f"{r.name}={r.state}/{r.sync_state}" for r in s.replicas)
                  if s.role == "primary" else f"from {s.upstream or '-'} {'streaming' if s.streaming else 'NOT streaming'}")
        lines.append(f"{s.node.name:6} {addr:22} {s.role:8} {s.timeline:>3} {s.lsn:>14}  {detail}")
    probs = problems(spec, sts)
    lines.append("problems: " + ("none" if not probs else ""))
    lines += [f"  - {p}" for p in probs]
    return "\n".join(lines)
