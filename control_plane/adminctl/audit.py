"""``keyward audit list`` (ListAuditEvents, paged) and ``keyward health`` (grpc.health.v1).

``keyward audit verify`` (the hash-chain check, in the database) stays in ``control_plane.cli``."""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.adminctl.connect import REFUSED, CliError, connect, leaf, org_hint, platform_hint
from control_plane.adminctl.output import add_output, print_json, table, ts
from protos.keyward.v1 import keyward_pb2 as pb

PAGE = 1000
SERVICES = ("", "keyward.v1.Admin", "keyward.v1.KeyDistribution")


def add_audit(audit_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = leaf(audit_sub, "list", "list audit events (one org's, or every org's as the platform admin)",
             example="keyward audit list acme --limit 20",
             description="List audit events, oldest first, from --after-seq on (the API pages forwards by "
                         "sequence number; this fetches as many pages as --limit needs, 1000 events a call). "
                         "When more remain, the table ends with the --after-seq to continue from. Without ORG "
                         "every org's events are listed (platform admin only).")
    p.add_argument("org", nargs="?", default="", metavar="ORG")
    p.add_argument("--after-seq", type=int, default=0, metavar="N", help="events with a sequence number above N")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N events (default 100)")
    p.add_argument("--all", action="store_true", help="every event from --after-seq on (no --limit)")
    add_output(p)
    p.set_defaults(run=audit_list)


def add_health(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = leaf(sub, "health", "ask the CA whether it serves (grpc.health.v1); exit 0 when SERVING, else 1",
             timeout=10, example="keyward health --identity platform-admin && echo serving",
             description="Check the CA's health over mTLS (any keyward identity will do). Without --service "
                         "the overall status decides the exit code, and the table shows the Admin and "
                         "KeyDistribution services too: Admin is NOT_SERVING while no database primary is "
                         "reachable, KeyDistribution only when no database server answers.")
    p.add_argument("--service", choices=SERVICES[1:], help="check only this service")
    add_output(p)
    p.set_defaults(run=health)


def audit_list(a: argparse.Namespace) -> int:
    if a.limit < 1:
        raise CliError("--limit must be at least 1 (or give --all)")
    events: list[pb.AuditEvent] = []
    after, more = a.after_seq, False
    hint = org_hint(a.org) if a.org else platform_hint() + " (or give ORG)"
    with connect(a) as c:
        while True:
            want = PAGE if a.all else min(PAGE, a.limit - len(events))
            page = c.call(c.admin.ListAuditEvents,
                          pb.ListAuditEventsRequest(org_id=a.org, after_seq=after, limit=want), hint=hint)
            events += page.events
            if len(page.events) < want:
                break
            after = page.events[-1].seq
            if not a.all and len(events) >= a.limit:
                # One event past the limit tells whether to print where to continue.
                more = bool(c.call(c.admin.ListAuditEvents, pb.ListAuditEventsRequest(
                    org_id=a.org, after_seq=after, limit=1), hint=hint).events)
                break
    if a.output == "json":
        print_json(pb.ListAuditEventsResponse(events=events))
        return 0
    print(table(["SEQ", "AT", "ACTOR", "ACTION", "ORG", "KEY", "OUTCOME", "DETAIL"], [
        (e.seq, ts(e.at), e.actor.split("/", 3)[-1] if e.actor.startswith("spiffe://") else e.actor, e.action,
         e.org_id or "-", e.key_id[:8] or "-", e.outcome, e.detail) for e in events]))
    if more:
        print(f"(more: keyward audit list {a.org + ' ' if a.org else ''}--after-seq {events[-1].seq})")
    return 0


def health(a: argparse.Namespace) -> int:
    services = (a.service,) if a.service else SERVICES
    status: dict[str, str] = {}
    with connect(a) as c:
        stub = health_pb2_grpc.HealthStub(c.channel)
        for s in services:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=c.timeout)
                status[s] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.NOT_FOUND:
                    raise c.failure(e) from None
                status[s] = "SERVICE_UNKNOWN"
    decisive = status[services[0]]
    if a.output == "json":
        print_json({"status": decisive} if a.service else
                   {"status": decisive, "services": {k: v for k, v in status.items() if k}})
    else:
        print(table(["SERVICE", "STATUS"], [(s or "(overall)", v) for s, v in status.items()]))
    return 0 if decisive == "SERVING" else REFUSED
