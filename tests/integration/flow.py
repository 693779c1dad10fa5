"""The admin flow as steps that tests compose."""

from __future__ import annotations

from pathlib import Path

from devstack import pki
from keylib import proxyauth
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import Clients, OrgRoot, clients

PROXY_SECRET = "keyward-test-proxy-credential"
"""Every test org's users give the ZEN ``org_id:PROXY_SECRET`` (pass proxy_credential_verifiers=[]
for an org reachable by source network only)."""
PROXY_VERIFIER = proxyauth.make(PROXY_SECRET, iterations=proxyauth.MIN_ITERATIONS)


def create_org(platform: Clients, org_id: str, **policy: object) -> pb.Organization:
    policy.setdefault("proxy_credential_verifiers", [PROXY_VERIFIER])
    return platform.admin.CreateOrganization(
        pb.CreateOrganizationRequest(org_id=org_id, display_name=f"{org_id} Inc", policy=pb.Policy(**policy)),
        timeout=30)


def org_admin(addr: str, pki_dir: Path, org_id: str) -> Clients:
    if not (pki_dir / f"org-admin-{org_id}.crt").exists():
        pki.org_admin(pki_dir, org_id)
    return clients(addr, pki_dir, f"org-admin-{org_id}")


def activate(admin: Clients, root: OrgRoot, org_id: str,
             algorithm: int = pb.KEY_ALGORITHM_UNSPECIFIED) -> tuple[pb.RequestIntermediateCsrResponse, pb.Intermediate, str]:
    csr = admin.admin.RequestIntermediateCsr(
        pb.RequestIntermediateCsrRequest(org_id=org_id, algorithm=algorithm), timeout=60)
    cert = root.sign(csr.csr_pem)
    inter = admin.admin.UploadIntermediateCertificate(
        pb.UploadIntermediateCertificateRequest(org_id=org_id, certificate_pem=cert,
                                                chain_pem=root.crt.read_text()), timeout=30)
    return csr, inter, cert
