"""The platform PKI in Kubernetes Secrets, created at install and rotated.

Secrets (``<release>-...``), each with ``tls.crt``, ``tls.key`` and ``ca.crt``:

    pki-root        the platform trust anchor (signs everything below)
    ca-tls          the CA's server identity (service names, localhost for port-forward)
    admin-tls       spiffe://<td>/platform-admin, for people with grpcurl
    zen-<pool>-tls  spiffe://<td>/zen-pool/<pool>, one per ZenPool

An identity is reissued when a third of its lifetime remains or when it was
not signed by the current root. The operator's own platform-admin identity
(for RegisterZenPool) lives only in its memory.

These are TLS identities only; org intermediate keys never pass through here.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from k8s.operator.config import OperatorConfig
from k8s.operator.kube import Kube, KubeError, Obj, path
from keylib.tlsid import build_cert, cert_pem, key_pem, renewal_due

ROOT_DAYS = 3650


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


@dataclass(frozen=True)
class Identity:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True)
class Root:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)


def _secret(cfg: OperatorConfig, name: str, data: dict[str, bytes], component: str,
            owners: list[Obj] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls" if "tls.crt" in data else "Opaque",
            "metadata": {"name": name, "namespace": cfg.namespace,
                         "labels": {"app.kubernetes.io/name": "keyward", "app.kubernetes.io/managed-by": "keyward-operator",
                                    "app.kubernetes.io/component": component},
                         **({"ownerReferences": owners} if owners else {})},
            "data": {k: _b64(v) for k, v in data.items()}}


async def ensure_root(kube: Kube, cfg: OperatorConfig) -> Root:
    """The platform root: read, or created once. Create-only: a second operator racing this one
    gets 409 and reads the winner's root; nothing ever overwrites a root another replica made."""
    name = f"{cfg.release}-pki-root"
    p = path("v1", "secrets", cfg.namespace, name)
    for _ in range(3):
        s = await kube.get(p)
        if s is not None:
            cert = x509.load_pem_x509_certificate(_unb64(s["data"]["tls.crt"]))
            key = serialization.load_pem_private_key(_unb64(s["data"]["tls.key"]), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise RuntimeError(f"Secret {name} holds no EC key: delete it to have the platform PKI reissued")
            if not renewal_due(cert, fraction=0.1):
                return Root(cert, key)
        cert, key = build_cert(subject_cn=f"{cfg.release} platform CA ({cfg.trust_domain})", issuer=None,
                               issuer_key=None, is_ca=True,
                               not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=ROOT_DAYS))
        body = _secret(cfg, name, {"tls.crt": cert_pem(cert), "tls.key": key_pem(key), "ca.crt": cert_pem(cert)}, "pki")
        try:
            if s is None:
                await kube.create(path("v1", "secrets", cfg.namespace), body)
            else:  # renewal: only over the version we read (a 409 means another replica renewed it)
                body["metadata"]["resourceVersion"] = s["metadata"]["resourceVersion"]
                await kube.replace(p, body)
            return Root(cert, key)
        except KubeError as e:
            if e.status != 409:
                raise
    raise RuntimeError(f"Secret {name} keeps changing under the operator: is another operator running?")


def issue(cfg: OperatorConfig, root: Root, spiffe_path: str, *, server: bool = False,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), days: float | None = None) -> Identity:
    now = dt.datetime.now(dt.UTC)
    cert, key = build_cert(subject_cn=spiffe_path.replace("/", ":"), issuer=root.cert, issuer_key=root.key,
                           uris=[f"spiffe://{cfg.trust_domain}/{spiffe_path}"], server=server, dns=dns, ips=ips,
                           not_after=now + dt.timedelta(days=days if days is not None else cfg.cert_days))
    return Identity(cert_pem(cert), key_pem(key), root.pem)


def _current(s: Obj | None, root: Root) -> bytes | None:
    """The Secret's certificate (PEM) if it is signed by ``root`` and not due for renewal."""
    if s is None or "tls.crt" not in (s.get("data") or {}):
        return None
    if _unb64(s["data"].get("ca.crt", "")) != root.pem:
        return None
    pem = _unb64(s["data"]["tls.crt"])
    return None if renewal_due(x509.load_pem_x509_certificate(pem)) else pem


async def current_identity(kube: Kube, cfg: OperatorConfig, root: Root, secret: str) -> bytes | None:
    """The identity Secret's certificate (PEM) if it is current: signed by ``root`` and not due."""
    return _current(await kube.get(path("v1", "secrets", cfg.namespace, secret)), root)


async def ensure_identity(kube: Kube, cfg: OperatorConfig, root: Root, secret: str, spiffe_path: str, *,
                          server: bool = False, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
                          owners: list[Obj] | None = None) -> tuple[bool, bytes]:
    """Create or renew one identity Secret. Returns (whether it was (re)issued, its certificate PEM)."""
    pem = _current(await kube.get(path("v1", "secrets", cfg.namespace, secret)), root)
    if pem is not None:
        return False, pem
    ident = issue(cfg, root, spiffe_path, server=server, dns=dns, ips=ips)
    await kube.apply("v1", "secrets", _secret(cfg, secret, {"tls.crt": ident.cert_pem, "tls.key": ident.key_pem,
                                                            "ca.crt": ident.ca_pem}, "pki", owners))
    return True, ident.cert_pem


def ca_server_names(cfg: OperatorConfig) -> tuple[str, ...]:
    svc = f"{cfg.release}-ca"
    host = cfg.ca_target.rsplit(":", 1)[0]
    names = [svc, f"{svc}.{cfg.namespace}", f"{svc}.{cfg.namespace}.svc", f"{svc}.{cfg.namespace}.svc.cluster.local",
             "localhost"]  # localhost: `kubectl port-forward` + grpcurl, as NOTES.txt shows
    if not host.replace(".", "").isdigit() and host not in names:
        names.append(host)
    return tuple(names)


async def ensure_platform(kube: Kube, cfg: OperatorConfig) -> tuple[Root, list[str]]:
    """The root, the CA's server identity and the admin identity."""
    root = await ensure_root(kube, cfg)
    done = []
    if (await ensure_identity(kube, cfg, root, f"{cfg.release}-ca-tls", "ca", server=True,
                              dns=ca_server_names(cfg), ips=("127.0.0.1",)))[0]:
        done.append(f"{cfg.release}-ca-tls")
    if (await ensure_identity(kube, cfg, root, f"{cfg.release}-admin-tls", "platform-admin"))[0]:
        done.append(f"{cfg.release}-admin-tls")
    return root, done
