"""``keyward org create|get|list`` and ``keyward org policy get|set``."""

from __future__ import annotations

import argparse

import grpc

from control_plane.adminctl import policy
from control_plane.adminctl.connect import REFUSED, CliError, Conn, connect, leaf, org_hint, platform_hint, spiffe_path
from control_plane.adminctl.output import add_output, as_dict, enum, fields, print_json, table, ts
from protos.keyward.v1 import keyward_pb2 as pb

AUDIT_PAGE = 1000


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    org = sub.add_parser("org", help="organizations and their policies",
                         description="Organizations: create, show, list; their policy.")
    osub = org.add_subparsers(dest="org_cmd", required=True, metavar="COMMAND")

    p = leaf(osub, "create", "create an organization (platform admin)", write=True,
             example="keyward org create acme --display-name 'Acme Corp' --fail-mode closed "
                     "--location-cidr 10.0.0.0/8",
             description="Create an organization with a policy (from --policy FILE and/or the flags; "
                         "unset fields take their defaults). " + policy.YAML_NOTE + ".")
    p.add_argument("org", metavar="ORG", help="3-63 lowercase letters, digits or '-', starting with a letter")
    p.add_argument("--display-name", default="", metavar="NAME", help="shown to people (default: ORG)")
    p.add_argument("--policy", metavar="FILE", help="the policy, JSON or YAML (then the flags apply on top)")
    policy.add_flags(p, removals=False)
    add_output(p)
    p.set_defaults(run=create)

    p = leaf(osub, "get", "show an organization and its policy", example="keyward org get acme")
    p.add_argument("org", metavar="ORG")
    add_output(p)
    p.set_defaults(run=get)

    p = leaf(osub, "list", "list the organizations the identity can see", example="keyward org list -o json",
             description="List organizations. The API has no ListOrganizations call: as the platform admin "
                         "this reads the audit log (ListAuditEvents, every CreateOrganization) and then "
                         "GetOrganization for each, so it takes longer as the log grows; an org admin sees "
                         "its own organization. -o json prints {\"organizations\": [Organization, ...]}.")
    add_output(p)
    p.set_defaults(run=list_orgs)

    pol = osub.add_parser("policy", help="show or change an organization's policy",
                          description="An organization's policy: what its ZENs enforce.")
    psub = pol.add_subparsers(dest="policy_cmd", required=True, metavar="COMMAND")
    p = leaf(psub, "get", "show an organization's policy", example="keyward org policy get acme -o json > policy.json",
             description="Show the policy; -o json prints the Policy message, which `org policy set --file` reads.")
    p.add_argument("org", metavar="ORG")
    add_output(p)
    p.set_defaults(run=policy_get)

    p = leaf(psub, "set", "change an organization's policy (from a file and/or flags) and print what changed",
             write=True, example="keyward org policy set acme --fail-mode closed --block-host '*.casino.example'",
             description="Change the policy. With --file, the file is the whole new policy (absent fields "
                         "take their defaults); the flags then change it further. Without --file the flags "
                         "change the current policy and keep the rest. The update names the version it read, "
                         "so a concurrent change is refused (run again), never overwritten. "
                         + policy.YAML_NOTE + ".")
    p.add_argument("org", metavar="ORG")
    p.add_argument("--file", "-f", metavar="FILE", help="the new policy, JSON or YAML")
    p.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    policy.add_flags(p, removals=True)
    add_output(p)
    p.set_defaults(run=policy_set)


def _get(c: Conn, org: str) -> pb.Organization:
    o: pb.Organization = c.call(c.admin.GetOrganization, pb.GetOrganizationRequest(org_id=org), hint=org_hint(org))
    return o


def _show_org(o: pb.Organization) -> str:
    head = fields([
        ("org_id", o.org_id), ("display_name", o.display_name), ("policy_version", o.policy_version),
        ("active_key_id", o.active_key_id or f"- (none yet: keyward key request {o.org_id})"),
        ("created_at", ts(o.created_at)), ("updated_at", ts(o.updated_at)),
    ])
    return head + "\npolicy:\n" + "\n".join("  " + ln for ln in policy.render(o.policy).splitlines())


def create(a: argparse.Namespace) -> int:
    base = policy.load_file(a.policy) if a.policy else pb.Policy()
    pol = policy.apply_flags(base, a)
    with connect(a) as c:
        o = c.call(c.admin.CreateOrganization, pb.CreateOrganizationRequest(
            org_id=a.org, display_name=a.display_name, policy=pol, request_id=c.request_id),
            hint=platform_hint(), write=True)
    if a.output == "json":
        print_json(o)
    else:
        print(f"created organization {o.org_id!r}\n{_show_org(o)}\n\nnext: an identity for its admin "
              f"(dev stack: keyward dev org-admin {o.org_id}), then "
              f"keyward key request {o.org_id} --identity org-admin-{o.org_id}")
    return 0


def get(a: argparse.Namespace) -> int:
    with connect(a) as c:
        o = _get(c, a.org)
    print_json(o) if a.output == "json" else print(_show_org(o))
    return 0


def _orgs_in_audit(c: Conn) -> list[str]:
    """Every org ever created, from the audit log (there is no ListOrganizations RPC)."""
    seen: dict[str, None] = {}
    after = 0
    while True:
        try:
            page = c.admin.ListAuditEvents(pb.ListAuditEventsRequest(after_seq=after, limit=AUDIT_PAGE),
                                           timeout=c.timeout)
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.PERMISSION_DENIED:
                raise CliError(f"PERMISSION_DENIED: identity {c.target.name!r} may not list organizations: that "
                               "needs the platform admin identity (--identity platform-admin), or an org admin's "
                               "(which sees its own org)", REFUSED) from None
            raise c.failure(e) from None
        for ev in page.events:
            if ev.action == "CreateOrganization" and ev.outcome == "ok" and ev.org_id:
                seen.setdefault(ev.org_id)
        if len(page.events) < AUDIT_PAGE:
            return list(seen)
        after = page.events[-1].seq


def list_orgs(a: argparse.Namespace) -> int:
    with connect(a) as c:
        path = spiffe_path(c.target.cert)
        ids = [path.split("/", 1)[1]] if path.startswith("org-admin/") else _orgs_in_audit(c)
        orgs = []
        for org_id in ids:
            try:
                orgs.append(c.admin.GetOrganization(pb.GetOrganizationRequest(org_id=org_id), timeout=c.timeout))
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.NOT_FOUND:
                    raise c.failure(e, hint=org_hint(org_id)) from None
    if a.output == "json":
        print_json({"organizations": [as_dict(o) for o in orgs]})
        return 0
    print(table(["ORG", "DISPLAY NAME", "POLICY", "FAIL MODE", "PRIVATE ZENS ONLY", "ACTIVE KEY", "CREATED"], [
        (o.org_id, o.display_name, f"v{o.policy_version}", enum(pb.FailMode.Name(o.policy.fail_mode), "FAIL_MODE_"),
         "yes" if o.policy.private_zen_only else "no", o.active_key_id or "-", ts(o.created_at))
        for o in orgs]))
    return 0


def policy_get(a: argparse.Namespace) -> int:
    with connect(a) as c:
        o = _get(c, a.org)
    if a.output == "json":
        print_json(o.policy)
    else:
        print(f"policy of {o.org_id!r} (version {o.policy_version}):\n{policy.render(o.policy)}")
    return 0


def policy_set(a: argparse.Namespace) -> int:
    if not a.file and not policy.has_flags(a):
        raise CliError("nothing to set: give --file FILE and/or policy flags (see keyward org policy set --help)")
    new_base = policy.load_file(a.file) if a.file else None
    with connect(a) as c:
        cur = _get(c, a.org)
        new = policy.apply_flags(new_base if new_base is not None else cur.policy, a)
        diff = policy.changes(cur.policy, new)
        if not diff or a.dry_run:
            if a.output == "json":
                print_json(new)
            else:
                print("\n".join(diff) if diff else f"no change: the policy of {a.org!r} is already so "
                                                   f"(version {cur.policy_version})")
                if diff:
                    print(f"(dry run: version {cur.policy_version} of {a.org!r} left as it is)")
            return 0
        o = c.call(c.admin.UpdatePolicy, pb.UpdatePolicyRequest(
            org_id=a.org, policy=new, expected_policy_version=cur.policy_version, request_id=c.request_id),
            hint=org_hint(a.org), write=True)
    if a.output == "json":
        print_json(o.policy)
    else:
        print(f"policy of {o.org_id!r}: version {cur.policy_version} -> {o.policy_version}")
        print("\n".join("  " + d for d in diff))
    return 0
