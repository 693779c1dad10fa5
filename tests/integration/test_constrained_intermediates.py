"""Constrained intermediates (issue 10, beyond every peer).

An org sets DNS name constraints in its policy; the CSR requests exactly them,
an upload without exactly them is refused, and the ZEN never mints a leaf for
a name outside them (such hosts are tunnelled, the origin's own certificate
reaching the client). A stolen intermediate is worthless for excluded names.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, code_of
from tests.integration.flow import create_org, org_admin
from tests.integration.test_zen import Web, Zen, curl, served_chain, start_zen, web  # noqa: F401 (fixture)

EXT = "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"


@pytest.fixture(scope="module")
def constrained(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[str, OrgRoot, Clients]:
    org_id = f"c-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id, permitted_dns_subtrees=["good.test", "dni.test"],
               excluded_dns_subtrees=["www.good.test"])
    return org_id, OrgRoot.create(tmp_path_factory.mktemp("croot"), org_id), org_admin(ca.addr, pki_dir, org_id)


def test_the_csr_requests_the_policy_constraints_and_uploads_must_carry_exactly_them(
    constrained: tuple[str, OrgRoot, Clients],
) -> None:
    org_id, root, admin = constrained
    csr_resp = admin.admin.RequestIntermediateCsr(pb.RequestIntermediateCsrRequest(org_id=org_id), timeout=60)
    csr = x509.load_pem_x509_csr(csr_resp.csr_pem.encode())
    ext = csr.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert [g.value for g in ext.value.permitted_subtrees or ()] == ["dni.test", "good.test"]
    assert [g.value for g in ext.value.excluded_subtrees or ()] == ["www.good.test"]

    def upload(cert: str) -> tuple[grpc.StatusCode, str]:
        return code_of(admin.admin.UploadIntermediateCertificate, pb.UploadIntermediateCertificateRequest(
            org_id=org_id, certificate_pem=cert, chain_pem=root.crt.read_text()))

    # Signed without the constraints (the root dropped the CSR's extension): refused.
    code, msg = upload(root.sign(csr_resp.csr_pem, ext=EXT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "name constraints (none) differ" in msg, msg
    # Signed with other constraints: refused, both sides named.
    code, msg = upload(root.sign(csr_resp.csr_pem, ext=EXT + "nameConstraints=critical,excluded;DNS:bank.test\n"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "excluded ['bank.test']" in msg \
        and "excluded ['www.good.test']" in msg, msg
    # Signed keeping the CSR's extension: accepted, and the stored certificate carries it.
    signed = root.sign(csr_resp.csr_pem, ext=EXT, extra_args=["-copy_extensions", "copy"])
    inter = admin.admin.UploadIntermediateCertificate(pb.UploadIntermediateCertificateRequest(
        org_id=org_id, certificate_pem=signed, chain_pem=root.crt.read_text()), timeout=30)
    assert inter.state == pb.INTERMEDIATE_STATE_ACTIVE
    cert = x509.load_pem_x509_certificate(signed.encode())
    assert cert.extensions.get_extension_for_class(x509.NameConstraints).value == ext.value


@pytest.fixture(scope="module")
def zen(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path  # noqa: F811
        ) -> Iterator[Zen]:
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    yield z
    z.proc.terminate()
    z.proc.wait(15)


def test_the_zen_never_mints_outside_the_constraints(
    constrained: tuple[str, OrgRoot, Clients], zen: Zen, web: Web,  # noqa: F811
) -> None:
    org_id, root, admin = constrained
    if not any(i.state == pb.INTERMEDIATE_STATE_ACTIVE for i in admin.admin.ListIntermediates(
            pb.ListIntermediatesRequest(org_id=org_id), timeout=30).intermediates):
        csr = admin.admin.RequestIntermediateCsr(pb.RequestIntermediateCsrRequest(org_id=org_id), timeout=60)
        admin.admin.UploadIntermediateCertificate(pb.UploadIntermediateCertificateRequest(
            org_id=org_id, certificate_pem=root.sign(csr.csr_pem, ext=EXT, extra_args=["-copy_extensions", "copy"]),
            chain_pem=root.crt.read_text()), timeout=30)
    # Inside: intercepted with a leaf from the constrained intermediate, which names only allowed hosts
    # (the origin's certificate also lists www.good.test, excluded: left out of the leaf).
    r = curl(zen, org_id, f"https://good.test:{web.port}/in", root.crt)
    assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
    leaf, inter = served_chain(zen, org_id, "good.test", web.port)[:2]
    assert inter.extensions.get_extension_for_class(x509.NameConstraints)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "good.test" in sans and "www.good.test" not in sans and "blocked.test" not in sans, sans
    # Excluded: no leaf; the connection is tunnelled and the client sees the origin's own certificate.
    chain = served_chain(zen, org_id, "www.good.test", web.port)
    assert chain and chain[0].subject.rfc4514_string() == "CN=good.test"  # the origin's, not a minted leaf
    assert chain[0].issuer != inter.subject
    r = curl(zen, org_id, f"https://www.good.test:{web.port}/out", web.root_crt)
    assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
