"""Permission matrix against the real CA over mTLS.

Covers: public ZEN vs private-only org, org admin of another org, no client
certificate, malformed identities, and the rule that an org the caller may
not see answers exactly like one that does not exist."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, code_of, wait_for
from tests.integration.flow import activate, create_org, org_admin

PD = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def private_org(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str) -> str:
    """An org with private_zen_only, an active key, bound to the 'private' pool."""
    create_org(platform, new_org_id, private_zen_only=True)
    activate(org_admin(ca.addr, pki_dir, new_org_id), OrgRoot.create(tmp_path, new_org_id), new_org_id)
    pools = {p.name: p for p in platform.admin.ListZenPools(pb.ListZenPoolsRequest(), timeout=30).pools}
    bound = list(pools["private"].org_ids) + [new_org_id]
    platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(
        name="private", visibility=pb.POOL_VISIBILITY_PRIVATE, org_ids=bound)), timeout=30)
    return new_org_id


def _audit_outcomes(pg: PgCluster, org_id: str, action: str) -> list[str]:
    return pg.psql(f"SELECT outcome FROM audit_events WHERE org_id = '{org_id}' AND action = '{action}' ORDER BY seq").split()


def test_private_only_org_key_never_goes_to_public_zen(
    ca: CAProcess, pki_dir: Path, pg: PgCluster, private_org: str,
) -> None:
    public = clients(ca.addr, pki_dir, "zen-public")
    private = clients(ca.addr, pki_dir, "zen-private")
    code, msg = code_of(public.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=private_org))
    assert code == PD
    # A nonexistent org gets the very same answer: no oracle.
    code2, msg2 = code_of(public.keys.GetKeyPair, pb.GetKeyPairRequest(org_id="no-such-org"))
    assert code2 == PD and msg2 == msg.replace(private_org, "no-such-org")
    kp = private.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=private_org), timeout=30)
    assert kp.encrypted_private_key and kp.org_id == private_org
    # Watching it from a public pool delivers nothing of it; a private pool
    # watching an org it does not serve is refused.
    code, _ = code_of(lambda *a, **k: next(iter(clients(ca.addr, pki_dir, "zen-private").keys.WatchKeys(*a, **k))),
                      pb.WatchKeysRequest(org_ids=["not-bound-org"]))
    assert code == PD
    # Every refusal is audited; the successful send is audited as KeySent.
    assert _audit_outcomes(pg, private_org, "GetKeyPair") == ["PERMISSION_DENIED"]
    assert _audit_outcomes(pg, private_org, "KeySent") == ["ok"]
    wait_for(lambda: _audit_outcomes(pg, "not-bound-org", "WatchKeys") == ["PERMISSION_DENIED"], 10,
             "the WatchKeys refusal in the audit log")


def test_private_pool_cannot_get_unbound_org(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    activate(org_admin(ca.addr, pki_dir, new_org_id), OrgRoot.create(tmp_path, new_org_id), new_org_id)
    private = clients(ca.addr, pki_dir, "zen-private")
    code, _ = code_of(private.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=new_org_id))
    assert code == PD
    public = clients(ca.addr, pki_dir, "zen-public")
    assert public.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30).key_id


def test_org_becoming_private_revokes_public_access(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    activate(admin, OrgRoot.create(tmp_path, new_org_id), new_org_id)
    public = clients(ca.addr, pki_dir, "zen-public")
    stream = public.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[new_org_id]), timeout=30)
    stream.initial_metadata()
    admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=new_org_id, policy=pb.Policy(private_zen_only=True)),
                             timeout=30)
    ev = next(iter(stream))
    stream.cancel()
    assert ev.kind == pb.KEY_EVENT_KIND_ACCESS_REVOKED and ev.org_id == new_org_id
    assert not ev.HasField("policy")  # the public pool learns nothing more of it
    code, _ = code_of(public.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=new_org_id))
    assert code == PD


def test_org_admin_is_confined_to_its_org(ca: CAProcess, platform: Clients, pki_dir: Path, new_org_id: str) -> None:
    create_org(platform, new_org_id)
    other = org_admin(ca.addr, pki_dir, "acme")  # admin of a different org
    calls = [
        (other.admin.GetOrganization, pb.GetOrganizationRequest(org_id=new_org_id)),
        (other.admin.UpdatePolicy, pb.UpdatePolicyRequest(org_id=new_org_id, policy=pb.Policy())),
        (other.admin.RequestIntermediateCsr, pb.RequestIntermediateCsrRequest(org_id=new_org_id)),
        (other.admin.ListIntermediates, pb.ListIntermediatesRequest(org_id=new_org_id)),
        (other.admin.ListAuditEvents, pb.ListAuditEventsRequest(org_id=new_org_id)),
        (other.admin.ListAuditEvents, pb.ListAuditEventsRequest()),
        (other.admin.CreateOrganization, pb.CreateOrganizationRequest(org_id="o-sneaky")),
        (other.admin.RegisterZenPool, pb.RegisterZenPoolRequest(pool=pb.ZenPool(
            name="rogue", visibility=pb.POOL_VISIBILITY_PUBLIC))),
        (other.keys.GetKeyPair, pb.GetKeyPairRequest(org_id="acme")),
    ]
    for fn, req in calls:
        code, msg = code_of(fn, req)
        assert code == PD, (fn, code, msg)
    # Existing-but-foreign and nonexistent orgs look the same to an org admin.
    _, a = code_of(other.admin.GetOrganization, pb.GetOrganizationRequest(org_id=new_org_id))
    _, b = code_of(other.admin.GetOrganization, pb.GetOrganizationRequest(org_id="o-nonexistent1"))
    assert a.replace(new_org_id, "X") == b.replace("o-nonexistent1", "X")
    # The platform admin sees the org; a truly missing org is NOT_FOUND for it.
    assert platform.admin.GetOrganization(pb.GetOrganizationRequest(org_id=new_org_id), timeout=30).org_id
    code, _ = code_of(platform.admin.GetOrganization, pb.GetOrganizationRequest(org_id="o-nonexistent1"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_zen_cannot_use_admin_and_admin_cannot_fetch_keys(ca: CAProcess, platform: Clients, pki_dir: Path) -> None:
    zen = clients(ca.addr, pki_dir, "zen-public")
    code, _ = code_of(zen.admin.GetOrganization, pb.GetOrganizationRequest(org_id="acme"))
    assert code == PD
    code, msg = code_of(platform.keys.GetKeyPair, pb.GetKeyPairRequest(org_id="acme"))
    assert code == PD and "not a ZEN" in msg


def test_unregistered_pool_is_refused(ca: CAProcess, platform: Clients, pki_dir: Path) -> None:
    from devstack import pki

    pki.client(pki_dir, "zen-ghost", "zen-pool/ghost")
    ghost = clients(ca.addr, pki_dir, "zen-ghost")
    code, msg = code_of(ghost.keys.GetKeyPair, pb.GetKeyPairRequest(org_id="acme"))
    assert code == PD and "not registered" in msg


def test_no_client_certificate_is_refused_at_tls(ca: CAProcess, pki_dir: Path) -> None:
    anon = clients(ca.addr, pki_dir, None)
    code, _ = code_of(anon.admin.GetOrganization, pb.GetOrganizationRequest(org_id="acme"), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no call is made


@pytest.mark.parametrize("who,expect", [
    ("bad-no-san", "exactly one URI SAN"),
    ("bad-two-sans", "exactly one URI SAN"),
    ("bad-ca-flag", "CA certificate"),
    ("bad-foreign-domain", "trust domain"),
    ("bad-unknown-role", "no known role"),
])
def test_malformed_identities_are_refused(ca: CAProcess, platform: Clients, pki_dir: Path, who: str, expect: str) -> None:
    c = clients(ca.addr, pki_dir, who)
    code, msg = code_of(c.admin.ListZenPools, pb.ListZenPoolsRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and expect in msg
    # The server keeps serving everyone else.
    assert platform.admin.ListZenPools(pb.ListZenPoolsRequest(), timeout=30).pools
    # The refusal's audit row names the certificate (fingerprint), not just "unauthenticated".
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from tests.helpers import wait_for
    fp = x509.load_pem_x509_certificate((pki_dir / f"{who}.crt").read_bytes()).fingerprint(hashes.SHA256()).hex()

    def audited() -> bool:
        after = 0
        while True:
            ev = platform.admin.ListAuditEvents(pb.ListAuditEventsRequest(after_seq=after, limit=1000),
                                                timeout=30).events
            if any(e.action == "ListZenPools" and e.outcome == "UNAUTHENTICATED" and f"sha256:{fp}" in e.detail
                   for e in ev):
                return True
            if len(ev) < 1000:
                return False
            after = ev[-1].seq
    wait_for(audited, 20, "an audit row naming the refused certificate", interval=0.5)


def test_expired_client_certificate_is_refused(ca: CAProcess, pki_dir: Path) -> None:
    c = clients(ca.addr, pki_dir, "bad-expired")
    code, _ = code_of(c.admin.ListZenPools, pb.ListZenPoolsRequest(), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake
    # The same with the openssl client: gRPC's TLS layer verifies the peer after
    # the handshake and closes the connection before any HTTP/2 byte is served.
    p = subprocess.run(["openssl", "s_client", "-tls1_2", "-connect", ca.addr, "-CAfile", str(pki_dir / "ca.crt"),
                        "-cert", str(pki_dir / "bad-expired.crt"), "-key", str(pki_dir / "bad-expired.key")],
                       input="", capture_output=True, text=True, timeout=30)
    assert "unexpected eof" in p.stderr.lower()


@pytest.mark.parametrize("who", ["bad-no-san", "bad-ca-flag", "bad-foreign-domain"])
def test_health_and_reflection_obey_the_identity_rules(ca: CAProcess, pki_dir: Path, who: str) -> None:
    from tests.integration.test_grpcurl import _g

    r = _g(ca, pki_dir, who, "grpc.health.v1.Health/Check", data="{}")
    assert r.returncode != 0 and "Unauthenticated" in r.stderr, r.stdout + r.stderr
    r = _g(ca, pki_dir, who, "list")
    assert r.returncode != 0, r.stdout
    r = _g(ca, pki_dir, "zen-public", "grpc.health.v1.Health/Check", data="{}")
    assert r.returncode == 0 and "SERVING" in r.stdout


def test_public_pool_watching_a_private_or_missing_org_is_refused_and_audited(
    ca: CAProcess, pki_dir: Path, pg: PgCluster, private_org: str,
) -> None:
    public = clients(ca.addr, pki_dir, "zen-public")
    for org in (private_org, "o-never-existed"):
        code, msg = code_of(lambda *a, **k: next(iter(public.keys.WatchKeys(*a, **k))),
                            pb.WatchKeysRequest(org_ids=[org]))
        assert code == PD and "may not receive keys" in msg
    wait_for(lambda: _audit_outcomes(pg, private_org, "WatchKeys") == ["PERMISSION_DENIED"], 10,
             "the refusal in the audit log")


def test_pool_made_private_then_deregistered_revokes_and_refuses(
    ca: CAProcess, pki_dir: Path, pg: PgCluster, platform: Clients, tmp_path: Path, new_org_id: str,
) -> None:
    """What the operator does when a ZenPool is made private and later deleted:
    the pool's ZENs lose every org they no longer serve (ACCESS_REVOKED on
    their watch, refusals on GetKeyPair), and a deregistered pool gets nothing."""
    from devstack import pki as devpki

    pool = f"pz-{new_org_id[-8:]}"
    devpki.client(pki_dir, f"zen-{pool}", f"zen-pool/{pool}")
    create_org(platform, new_org_id, fail_mode=pb.FAIL_MODE_CLOSED)
    activate(org_admin(ca.addr, pki_dir, new_org_id), OrgRoot.create(tmp_path, new_org_id), new_org_id)
    reg = platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(
        name=pool, visibility=pb.POOL_VISIBILITY_PUBLIC)), timeout=30)
    assert reg.serves_fail_closed_org  # a public pool serves this fail-closed org
    zen = clients(ca.addr, pki_dir, f"zen-{pool}")
    kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30)
    assert kp.encrypted_private_key
    watch = zen.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[new_org_id], snapshot=True), timeout=60)
    first = next(watch)  # the snapshot: the stream is live before the change below
    assert first.kind == pb.KEY_EVENT_KIND_POLICY_CHANGED and first.org_id == new_org_id
    assert first.key_id == kp.key_id  # the org's active key (the snapshot once sent "")

    other = f"{new_org_id}-b"
    create_org(platform, other)
    made_private = platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(
        name=pool, visibility=pb.POOL_VISIBILITY_PRIVATE, org_ids=[other])), timeout=30)
    assert made_private.visibility == pb.POOL_VISIBILITY_PRIVATE and not made_private.serves_fail_closed_org
    ev = next(watch)
    assert (ev.kind, ev.org_id) == (pb.KEY_EVENT_KIND_ACCESS_REVOKED, new_org_id)
    watch.cancel()
    assert code_of(zen.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=new_org_id))[0] == PD

    gone = platform.admin.DeregisterZenPool(pb.DeregisterZenPoolRequest(name=pool, request_id=f"dereg-{pool}"),
                                            timeout=30)
    assert list(gone.org_ids) == [other]
    # A retry of the same request (outcome unknown) replays instead of failing.
    assert platform.admin.DeregisterZenPool(pb.DeregisterZenPoolRequest(name=pool, request_id=f"dereg-{pool}"),
                                            timeout=30).org_ids == [other]
    code, msg = code_of(zen.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=other))
    assert code == PD and "not registered" in msg
    assert pool not in {p.name for p in platform.admin.ListZenPools(pb.ListZenPoolsRequest(), timeout=30).pools}
    details = pg.psql(f"SELECT action || ' ' || detail FROM audit_events WHERE detail LIKE 'pool={pool} %' ORDER BY seq")
    assert "visibility=private (was public)" in details and f"DeregisterZenPool pool={pool}" in details
