"""k8s.operator.pki against the KMock API stand-in: the platform PKI is created
once, kept while valid, and renewed when due or when not signed by the root."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509

from k8s.operator import pki
from k8s.operator.config import OperatorConfig
from k8s.operator.kube import Endpoint, Kube
from keylib.tlsid import build_cert, cert_pem, key_pem
from tests.k8s.kapi import NS, KeywardApi, install, obj

pytestmark = pytest.mark.kmock(cls=KeywardApi)


def _cert(api: KeywardApi, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(obj(api, "v1/secrets", name)["data"]["tls.crt"]))


async def test_platform_pki_created_kept_and_renewed(kmock: KeywardApi) -> None:
    install(kmock)
    cfg = OperatorConfig(kube_api=str(kmock.url), namespace=NS)
    kube = Kube(Endpoint.resolve(cfg.kube_api))
    try:
        root, issued = await pki.ensure_platform(kube, cfg)
        assert issued == ["keyward-ca-tls", "keyward-admin-tls"]  # no passwords Secret yet: no passfile
        srv = _cert(kmock, "keyward-ca-tls")
        san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://keyward/ca"]
        assert {"keyward-ca", "keyward-ca.keyward.svc", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
        srv.verify_directly_issued_by(root.cert)
        admin = _cert(kmock, "keyward-admin-tls")
        assert admin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier) == ["spiffe://keyward/platform-admin"]
        assert (admin.not_valid_after_utc - admin.not_valid_before_utc).days in (89, 90)

        # A second run (operator restart) keeps everything.
        root2, issued = await pki.ensure_platform(kube, cfg)
        assert issued == [] and root2.pem == root.pem and _cert(kmock, "keyward-ca-tls") == srv

        # Two thirds of its life gone: renewed. Signed by another root: replaced.
        now = dt.datetime.now(dt.UTC)
        old, old_key = build_cert(subject_cn="old", issuer=root.cert, issuer_key=root.key,
                                  uris=["spiffe://keyward/platform-admin"],
                                  not_before=now - dt.timedelta(days=70), not_after=now + dt.timedelta(days=20))
        other, other_key = build_cert(subject_cn="other root", issuer=None, issuer_key=None, is_ca=True)
        forged, forged_key = build_cert(subject_cn="forged", issuer=other, issuer_key=other_key,
                                        uris=["spiffe://keyward/ca"], server=True)
        for name, c, k, ca in (("keyward-admin-tls", old, old_key, root.cert), ("keyward-ca-tls", forged, forged_key, other)):
            kmock.objects["v1/secrets", NS, name].patch({"data": {
                "tls.crt": base64.b64encode(cert_pem(c)).decode(), "tls.key": base64.b64encode(key_pem(k)).decode(),
                "ca.crt": base64.b64encode(cert_pem(ca)).decode()}})
        _, issued = await pki.ensure_platform(kube, cfg)
        assert sorted(issued) == ["keyward-admin-tls", "keyward-ca-tls"]
        _cert(kmock, "keyward-ca-tls").verify_directly_issued_by(root.cert)
        assert _cert(kmock, "keyward-admin-tls").not_valid_after_utc > now + dt.timedelta(days=80)
    finally:
        await kube.close()
