"""Tests that catch what they guard (issue 16).

Each test here was written against a hand-made break of the rule it names and
failed with it: URL prefixes blocked on every request of a kept-alive tunnel,
not only its first; a public pool's WatchKeys snapshot and event stream carrying
nothing of a private-only org; the old org key leaving every ZEN process when a
rotation installs the new one.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, wait_for
from tests.integration.flow import PROXY_SECRET, PROXY_VERIFIER, activate, create_org, org_admin
from tests.integration.test_zen import (  # noqa: F401 (fixtures)
    Web,
    Zen,
    _holders,
    _key_needles,
    _procs,
    curl,
    org,
    served_chain,
    start_zen,
    web,
    zen,
)

# ------------------------------------------------------------------ the inspected tunnel

def test_a_blocked_url_prefix_is_refused_on_a_kept_alive_tunnel_after_an_allowed_request(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],  # noqa: F811 (pytest fixtures, imported above)
) -> None:
    """Every request inside an intercepted tunnel is checked, not only its first: an allowed
    request, then one under a blocked prefix (good.test/private/) on the same connection."""
    org_id, root, _ = org
    r = subprocess.run(["curl", "-sS", "-v", "--max-time", "20", "--proxy", f"http://127.0.0.1:{zen.port}",
                        "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(root.crt),
                        "-w", "\n[%{http_code}]\n",
                        f"https://good.test:{web.port}/open", f"https://good.test:{web.port}/private/secret"],
                       capture_output=True, text=True, timeout=30)
    assert "Re-using existing connection" in r.stderr, r.stderr[-800:]  # one tunnel, two requests
    first, _, second = r.stdout.partition("[200]")
    assert "hello from good.test" in first and first.rstrip().endswith("/open"), r.stdout
    assert second.rstrip().endswith("[403]") and "blocked by your organization" in second, r.stdout
    assert "hello from" not in second, r.stdout  # the origin never saw it
    # The access line is written once the page is sent: waited for, not raced.
    wait_for(lambda: '"path": "/private/secret", "status": 403' in zen.log.read_text(), 10, "the 403 in the access log")


# ------------------------------------------------------------------ what a public pool sees

def _private_org(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path) -> tuple[str, Clients, OrgRoot]:
    """A private-only org with an active key, bound to the 'private' pool."""
    org_id = f"pg-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id, private_zen_only=True)
    admin = org_admin(ca.addr, pki_dir, org_id)
    root = OrgRoot.create(tmp_path, org_id)
    activate(admin, root, org_id)
    pools = {p.name: p for p in platform.admin.ListZenPools(pb.ListZenPoolsRequest(), timeout=30).pools}
    platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(
        name="private", visibility=pb.POOL_VISIBILITY_PRIVATE, org_ids=list(pools["private"].org_ids) + [org_id])),
        timeout=30)
    return org_id, admin, root


def _mark(platform: Clients, org_id: str) -> Callable[[pb.KeyEvent], bool]:
    """A policy change of a public org, an event every public stream is sent; returns what
    recognizes it (not the org's earlier events: a stream's starting seq may lag the log a little)."""
    host = f"mark-{uuid.uuid4().hex[:8]}.test"
    platform.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=org_id, policy=pb.Policy(
        proxy_credential_verifiers=[PROXY_VERIFIER], blocked_hosts=[host])), timeout=30)
    return lambda e: (e.seq > 0 and e.org_id == org_id and e.kind == pb.KEY_EVENT_KIND_POLICY_CHANGED
                      and host in e.policy.blocked_hosts)


def _until(stream: Iterable[pb.KeyEvent], done: Callable[[pb.KeyEvent], bool], what: str) -> list[pb.KeyEvent]:
    """The stream's events up to and including the first ``done`` one (bounded by the call's deadline)."""
    seen: list[pb.KeyEvent] = []
    try:
        for ev in stream:
            seen.append(ev)
            if done(ev):
                return seen
    except grpc.RpcError as e:
        raise AssertionError(f"{what}: stream ended with {e.code()} after {[(x.seq, x.org_id) for x in seen]}"
                             ) from None
    raise AssertionError(f"{what}: stream ended after {[(x.seq, x.org_id) for x in seen]}")


def test_a_public_pools_snapshot_carries_nothing_of_a_private_only_org(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    private_org, _, _ = _private_org(ca, platform, pki_dir, tmp_path)
    create_org(platform, new_org_id)  # public
    # The private pool's snapshot does carry the org (what the public one must not).
    watch = clients(ca.addr, pki_dir, "zen-private").keys.WatchKeys(
        pb.WatchKeysRequest(org_ids=[private_org], snapshot=True), timeout=60)
    first = next(watch)
    watch.cancel()
    assert (first.seq, first.kind, first.org_id) == (0, pb.KEY_EVENT_KIND_POLICY_CHANGED, private_org)

    watch = clients(ca.addr, pki_dir, "zen-public").keys.WatchKeys(pb.WatchKeysRequest(snapshot=True), timeout=60)
    watch.initial_metadata()
    is_mark = _mark(platform, new_org_id)  # a live event: it follows the whole snapshot
    events = _until(watch, is_mark, "the public snapshot, then the marker")
    watch.cancel()
    snapshot = [e for e in events if e.seq == 0]
    assert new_org_id in {e.org_id for e in snapshot}
    leaked = [(e.seq, pb.KeyEventKind.Name(e.kind), e.org_id) for e in events if e.org_id == private_org]
    assert not leaked, f"a public pool's snapshot carried the private-only org: {leaked}"


def test_public_watchers_get_no_rotation_or_policy_event_of_a_private_only_org(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    """Streams with no org filter get events of every org their pool serves, and only those: a
    private-only org is rotated and its policy changed, then a public org's change follows as a
    marker. Live and replayed (after_seq) public streams see the marker and nothing before it of
    the private org; the private pool sees both of its events."""
    private_org, admin, root = _private_org(ca, platform, pki_dir, tmp_path)
    create_org(platform, new_org_id)  # public
    public = clients(ca.addr, pki_dir, "zen-public")
    live = public.keys.WatchKeys(pb.WatchKeysRequest(), timeout=60)
    after = int(dict(live.initial_metadata())["keyward-event-seq"])  # subscribed: later events reach it

    _, inter, _ = activate(admin, root, private_org)  # ROTATED
    admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=private_org, policy=pb.Policy(
        private_zen_only=True, proxy_credential_verifiers=[PROXY_VERIFIER], blocked_hosts=["secret.test"])),
        timeout=30)  # POLICY_CHANGED
    is_mark = _mark(platform, new_org_id)

    seen = _until(live, is_mark, "the marker on the live public stream")
    live.cancel()
    replay = public.keys.WatchKeys(pb.WatchKeysRequest(after_seq=after), timeout=60)
    replayed = _until(replay, is_mark, "the marker on the replaying public stream")
    replay.cancel()
    for name, events in (("live", seen), ("replayed", replayed)):
        leaked = [(e.seq, pb.KeyEventKind.Name(e.kind), e.org_id, list(e.policy.blocked_hosts))
                  for e in events if e.org_id == private_org]
        assert not leaked, f"the {name} public stream was sent events of a private-only org: {leaked}"
    # The events exist: the private pool is sent both.
    private = clients(ca.addr, pki_dir, "zen-private").keys.WatchKeys(
        pb.WatchKeysRequest(org_ids=[private_org], after_seq=after), timeout=60)
    mine = _until(private, lambda e: e.kind == pb.KEY_EVENT_KIND_POLICY_CHANGED and
                  list(e.policy.blocked_hosts) == ["secret.test"], "the private pool's events")
    private.cancel()
    assert (pb.KEY_EVENT_KIND_ROTATED, inter.key_id) in [(e.kind, e.key_id) for e in mine]


def test_a_public_replay_carries_nothing_from_while_an_org_was_private_only(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path,
) -> None:
    """An org rotates while private-only, then is made public. A public stream replaying that range
    is sent the change that made the org public, not the rotation from before: an event is for the
    pools serving its org when it was written. (Checked at delivery time, against the org as it is
    now, the rotation was once sent.)"""
    public = clients(ca.addr, pki_dir, "zen-public")
    head = public.keys.WatchKeys(pb.WatchKeysRequest(), timeout=60)
    after = int(dict(head.initial_metadata())["keyward-event-seq"])
    head.cancel()
    org_id, admin, _ = _private_org(ca, platform, pki_dir, tmp_path)  # created, ROTATED: private-only
    made_public = admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=org_id, policy=pb.Policy(
        proxy_credential_verifiers=[PROXY_VERIFIER])), timeout=30)
    replay = public.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[org_id], after_seq=after), timeout=60)
    events = _until(replay, lambda e: e.kind == pb.KEY_EVENT_KIND_POLICY_CHANGED and e.org_id == org_id,
                    "the change that made the org public")
    replay.cancel()
    assert [(pb.KeyEventKind.Name(e.kind), e.policy_version) for e in events] == \
        [("KEY_EVENT_KIND_POLICY_CHANGED", made_public.policy_version)]


def test_a_live_stream_and_its_replay_carry_the_same_history(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    """A public org rotates, then is made private-only: a public pool's live stream is sent the
    rotation, then ACCESS_REVOKED; a replay of the same range, after the change, is sent the same
    two (each event goes to the pools entitled to it when it was written), nothing more."""
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    public = clients(ca.addr, pki_dir, "zen-public")
    live = public.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[new_org_id]), timeout=60)
    after = int(dict(live.initial_metadata())["keyward-event-seq"])
    activate(admin, OrgRoot.create(tmp_path, new_org_id), new_org_id)
    admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=new_org_id, policy=pb.Policy(private_zen_only=True)),
                             timeout=30)
    revoked = lambda e: e.kind == pb.KEY_EVENT_KIND_ACCESS_REVOKED and e.org_id == new_org_id  # noqa: E731
    seen = _until(live, revoked, "ACCESS_REVOKED on the live stream")
    live.cancel()
    replay = public.keys.WatchKeys(pb.WatchKeysRequest(after_seq=after), timeout=60)  # no filter: it is private now
    replayed = _until(replay, revoked, "ACCESS_REVOKED on the replay")
    replay.cancel()
    mine = [[(e.seq, pb.KeyEventKind.Name(e.kind)) for e in events if e.org_id == new_org_id]
            for events in (seen, replayed)]
    assert mine[0] == mine[1]
    assert [k for _, k in mine[0]] == ["KEY_EVENT_KIND_ROTATED", "KEY_EVENT_KIND_ACCESS_REVOKED"]


# ------------------------------------------------------------------ rotation in the ZEN

def test_a_rotation_ends_the_old_signer_and_leaves_the_old_key_in_no_process(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web,  # noqa: F811 (fixture)
    workdir: Path, tmp_path: Path,
) -> None:
    org_id = f"r-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id)
    admin = org_admin(ca.addr, pki_dir, org_id)
    root = OrgRoot.create(tmp_path, org_id)
    activate(admin, root, org_id)
    old_needles = _key_needles(ca, pki_dir, master_secret[0], org_id)
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    try:
        r = curl(z, org_id, f"https://good.test:{web.port}/before", root.crt)
        assert r.returncode == 0, r.stderr
        old_signers = _holders(_procs(z.proc.pid), old_needles)
        assert old_signers and z.proc.pid not in old_signers, old_signers  # the scan sees the old key

        _, inter, _ = activate(admin, root, org_id)  # rotation: the ZEN follows the ROTATED event
        new_serial = int(inter.serial_hex, 16)
        wait_for(lambda: (lambda c: len(c) == 2 and c[1].serial_number == new_serial)(
            served_chain(z, org_id, "good.test", web.port)), 10, "new connections to get the new intermediate")
        new_needles = _key_needles(ca, pki_dir, master_secret[0], org_id)
        assert _holders(_procs(z.proc.pid), new_needles), "the new key is in no ZEN process"
        left = _holders(_procs(z.proc.pid), old_needles)
        assert not left, f"the rotated-out key is still in ZEN processes {left} (ZEN {z.proc.pid})"
        alive = [p for p in old_signers if os.path.exists(f"/proc/{p}")]
        assert not alive, f"the old key's signer {alive} still runs after the rotation"
    finally:
        z.proc.terminate()
        z.proc.wait(15)
