"""``keyward pool list|register|bind|unbind|deregister``: ZEN pools (platform admin)."""

from __future__ import annotations

import argparse

from control_plane.adminctl.connect import CliError, Conn, connect, leaf, platform_hint
from control_plane.adminctl.output import add_output, enum, print_json, table
from protos.keyward.v1 import keyward_pb2 as pb

PUBLIC, PRIVATE = pb.POOL_VISIBILITY_PUBLIC, pb.POOL_VISIBILITY_PRIVATE


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pool = sub.add_parser("pool", help="ZEN pools (platform admin)",
                          description="ZEN pools: a ZEN of pool P presents spiffe://<td>/zen-pool/P. A public pool "
                                      "serves every org that is not private_zen_only; a private pool serves the "
                                      "orgs bound to it. All pool commands need the platform admin identity.")
    psub = pool.add_subparsers(dest="pool_cmd", required=True, metavar="COMMAND")

    p = leaf(psub, "list", "list the registered pools", example="keyward pool list")
    add_output(p)
    p.set_defaults(run=list_pools)

    p = leaf(psub, "register", "register a pool (or change one: --replace)", write=True,
             example="keyward pool register bank-zens --private-for bank",
             description="Register a pool: public by default; --private (or --private-for ORG) makes it private, "
                         "serving the orgs named. Registering an existing pool replaces its visibility and orgs: "
                         "orgs it would stop serving are cut off at once (their ZENs drop the keys), so that needs "
                         "--replace; to add or remove one org use `pool bind` / `pool unbind`.")
    p.add_argument("pool", metavar="POOL")
    p.add_argument("--private", action="store_true", help="a private pool (with no orgs unless --private-for)")
    p.add_argument("--private-for", action="append", default=[], metavar="ORG",
                   help="a private pool serving ORG (repeatable)")
    p.add_argument("--replace", action="store_true",
                   help="allow changing an existing pool so that it stops serving some orgs")
    add_output(p)
    p.set_defaults(run=register)

    for name, verb in (("bind", "serve"), ("unbind", "stop serving")):
        p = leaf(psub, name, f"make a private pool {verb} organizations", write=True,
                 example=f"keyward pool {name} bank-zens bank",
                 description=f"Make a private pool {verb} the orgs named (reads the pool, then registers it with "
                             "the changed list; the API has no per-org call)." +
                             (" Its ZENs drop those orgs' keys at once." if name == "unbind" else ""))
        p.add_argument("pool", metavar="POOL")
        p.add_argument("orgs", nargs="+", metavar="ORG")
        add_output(p)
        p.set_defaults(run=bind if name == "bind" else unbind)

    p = leaf(psub, "deregister", "remove a pool: its ZENs get no key from now on", write=True,
             example="keyward pool deregister old-pool")
    p.add_argument("pool", metavar="POOL")
    add_output(p)
    p.set_defaults(run=deregister)


def _vis(v: int) -> str:
    return enum(pb.PoolVisibility.Name(v), "POOL_VISIBILITY_").lower()


def _show(p: pb.ZenPool) -> str:
    orgs = ", ".join(p.org_ids) or ("every org not private_zen_only" if p.visibility == PUBLIC else "none")
    return f"pool {p.name!r}: {_vis(p.visibility)}, serves {orgs}"


def _pools(c: Conn) -> dict[str, pb.ZenPool]:
    r = c.call(c.admin.ListZenPools, pb.ListZenPoolsRequest(), hint=platform_hint())
    return {p.name: p for p in r.pools}


def _register(c: Conn, a: argparse.Namespace, pool: pb.ZenPool) -> int:
    got = c.call(c.admin.RegisterZenPool, pb.RegisterZenPoolRequest(pool=pool, request_id=c.request_id),
                 hint=platform_hint(), write=True)
    print_json(got) if a.output == "json" else print(f"registered {_show(got)}")
    return 0


def list_pools(a: argparse.Namespace) -> int:
    with connect(a) as c:
        r = c.call(c.admin.ListZenPools, pb.ListZenPoolsRequest(), hint=platform_hint())
    if a.output == "json":
        print_json(r)
    else:
        print(table(["POOL", "VISIBILITY", "ORGS", "SERVES A FAIL-CLOSED ORG"], [
            (p.name, _vis(p.visibility), ", ".join(p.org_ids) or ("(all public)" if p.visibility == PUBLIC else "-"),
             "yes" if p.serves_fail_closed_org else "no") for p in r.pools]))
    return 0


def register(a: argparse.Namespace) -> int:
    private = a.private or bool(a.private_for)
    want = pb.ZenPool(name=a.pool, visibility=PRIVATE if private else PUBLIC, org_ids=sorted(set(a.private_for)))
    with connect(a) as c:
        old = _pools(c).get(a.pool)
        if old is not None and not a.replace:
            dropped = sorted(set(old.org_ids) - set(want.org_ids))
            if old.visibility != want.visibility or dropped:
                what = (f"turn it {_vis(want.visibility)}" if old.visibility != want.visibility
                        else f"stop it serving {', '.join(dropped)}")
                raise CliError(f"{_show(old)}; this would {what}, cutting ZENs off at once: give --replace to do "
                               f"that, or use `keyward pool bind {a.pool} ORG` to add an org")
        return _register(c, a, want)


def _change(a: argparse.Namespace, add: bool) -> int:
    with connect(a) as c:
        old = _pools(c).get(a.pool)
        if old is None:
            raise CliError(f"no pool {a.pool!r} is registered (keyward pool list)", 1)
        if old.visibility != PRIVATE:
            raise CliError(f"{_show(old)}: only private pools are bound to orgs", 1)
        orgs = set(old.org_ids)
        orgs = orgs | set(a.orgs) if add else orgs - set(a.orgs)
        if orgs == set(old.org_ids):
            print_json(old) if a.output == "json" else print(f"no change: {_show(old)}")
            return 0
        return _register(c, a, pb.ZenPool(name=a.pool, visibility=PRIVATE, org_ids=sorted(orgs)))


def bind(a: argparse.Namespace) -> int:
    return _change(a, True)


def unbind(a: argparse.Namespace) -> int:
    return _change(a, False)


def deregister(a: argparse.Namespace) -> int:
    with connect(a) as c:
        p = c.call(c.admin.DeregisterZenPool, pb.DeregisterZenPoolRequest(name=a.pool, request_id=c.request_id),
                   hint=platform_hint(), write=True)
    print_json(p) if a.output == "json" else print(f"deregistered {_show(p)}")
    return 0
