"""Who calls and where: the identity (an mTLS client certificate), the channel to the CA, and
one call with its failure turned into one line and an exit code.

Identity: ``--identity NAME`` (or ``$KEYWARD_IDENTITY``) reads ``NAME.crt``/``NAME.key`` and the
trust anchor ``ca.crt`` from ``--pki-dir`` (or ``$KEYWARD_PKI_DIR``); ``--cert``/``--key``/
``--cacert`` name the files directly (and win over the identity's). Address: ``--addr`` or
``$KEYWARD_CA_ADDR``.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509

from common.status import Outcome, classify
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc

OK, REFUSED, USAGE, UNREACHABLE, RETRY = 0, 1, 2, 3, 4
"""Exit codes: 0 done; 1 the CA refused or failed the request (or health is not SERVING);
2 usage or a local problem (missing file, no identity, bad input file); 3 no answer from the CA
(cannot connect, TLS handshake failed, or nothing within --timeout); 4 the CA answered that it
cannot do it now (common.status RETRY: no database primary, busy, a concurrent change, its own
deadline): the same command may succeed later (a write: with the same --request-id)."""

ENV_VARS = ("KEYWARD_CA_ADDR", "KEYWARD_IDENTITY", "KEYWARD_PKI_DIR")

T = TypeVar("T")


class CliError(Exception):
    """A failure to report as one line (``keyward: <message>``) with an exit code."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def add_options(p: argparse.ArgumentParser, *, write: bool = False, timeout: float = 30) -> None:
    """The connection options every command that calls the CA takes."""
    g = p.add_argument_group("connection (environment: " + ", ".join(ENV_VARS) + ")")
    g.add_argument("--identity", metavar="NAME",
                   help="NAME.crt/NAME.key (and ca.crt) in the PKI dir, e.g. platform-admin or org-admin-ORG "
                        "(default: $KEYWARD_IDENTITY)")
    g.add_argument("--pki-dir", metavar="DIR", help="folder of identities (default: $KEYWARD_PKI_DIR)")
    g.add_argument("--cert", dest="tls_cert", metavar="FILE", help="client certificate (PEM); instead of --identity")
    g.add_argument("--key", dest="tls_key", metavar="FILE", help="client private key (PEM); with --cert")
    g.add_argument("--cacert", dest="tls_cacert", metavar="FILE", help="trust anchor of the CA's server certificate "
                                                    "(default: ca.crt in the PKI dir)")
    g.add_argument("--addr", metavar="HOST:PORT", help="the CA's address (default: $KEYWARD_CA_ADDR)")
    g.add_argument("--server-name", metavar="NAME",
                   help="name to expect in the CA's certificate when --addr differs (e.g. a port-forward)")
    g.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                   help=f"give up on the CA after this long (default: {timeout:g})")
    if write:
        g.add_argument("--request-id", metavar="ID",
                       help="idempotency key: repeat a write whose outcome was unknown with the id it printed "
                            "and the CA returns the first result (default: a new UUID)")


@dataclass(frozen=True)
class Target:
    addr: str
    cert: Path
    key: Path
    cacert: Path
    name: str  # how to name the identity in messages
    server_name: str | None = None


def _pki_dir(a: argparse.Namespace) -> Path | None:
    d = a.pki_dir or os.environ.get("KEYWARD_PKI_DIR")
    return Path(d) if d else None


def _available(pki: Path) -> str:
    try:
        names = sorted(p.stem for p in pki.glob("*.crt") if p.stem not in ("ca", "server")
                       and (pki / f"{p.stem}.key").exists())
    except OSError:
        return ""
    return f" (identities there: {', '.join(names)})" if names else ""


def resolve(a: argparse.Namespace) -> Target:
    """The identity and address from flags and environment, or a CliError saying what to set."""
    pki = _pki_dir(a)
    name = a.identity or os.environ.get("KEYWARD_IDENTITY") or ""
    if a.tls_cert or a.tls_key:
        if not (a.tls_cert and a.tls_key):
            raise CliError("give both --cert and --key (or --identity NAME)")
        cert, key, shown = Path(a.tls_cert), Path(a.tls_key), a.tls_cert
    elif name:
        if pki is None:
            raise CliError(f"identity {name!r}: set KEYWARD_PKI_DIR (or --pki-dir) to the folder holding "
                           f"{name}.crt, {name}.key and ca.crt (`source .run/env` after `make up`)")
        cert, key, shown = pki / f"{name}.crt", pki / f"{name}.key", name
    else:
        where = f"$KEYWARD_PKI_DIR ({pki})" if pki else "the folder set by KEYWARD_PKI_DIR or --pki-dir"
        avail = _available(pki) if pki else ""
        raise CliError("no identity: set KEYWARD_IDENTITY or give --identity NAME (e.g. platform-admin, "
                       f"org-admin-ORG), which reads NAME.crt, NAME.key and ca.crt from {where}{avail}; "
                       "or give --cert, --key and --cacert")
    cacert = Path(a.tls_cacert) if a.tls_cacert else (pki / "ca.crt" if pki else None)
    if cacert is None:
        raise CliError("give --cacert FILE (the CA's trust anchor) or set KEYWARD_PKI_DIR to a folder with ca.crt")
    missing = [str(p) for p in (cert, key, cacert) if not p.is_file()]
    if missing:
        src = f"KEYWARD_PKI_DIR={pki}" if pki and not (a.tls_cert or a.tls_cacert) else "the given files"
        raise CliError(f"identity {shown!r}: not found: {', '.join(missing)} (looked for {cert}, {key} and "
                       f"{cacert}; from {src}){_available(pki) if pki else ''}")
    addr = a.addr or os.environ.get("KEYWARD_CA_ADDR") or ""
    if not addr:
        raise CliError("no CA address: set KEYWARD_CA_ADDR (e.g. 127.0.0.1:50051; `source .run/env` after "
                       "`make up`) or give --addr HOST:PORT")
    return Target(addr, cert, key, cacert, shown, a.server_name)


def spiffe_path(cert_file: Path) -> str:
    """The caller's role path from its certificate (``platform-admin``, ``org-admin/acme``), or ""."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return ""
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return ""
    return uris[0][len("spiffe://"):].partition("/")[2]


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {p}: {e.strerror}") from None


class Conn:
    """One channel to the CA; :meth:`call` makes one RPC and raises CliError on failure."""

    def __init__(self, t: Target, timeout: float, request_id: str | None = None) -> None:
        self.target = t
        self.timeout = timeout
        self.request_id = request_id or str(uuid.uuid4())
        creds = grpc.ssl_channel_credentials(root_certificates=_read(t.cacert), private_key=_read(t.key),
                                             certificate_chain=_read(t.cert))
        opts = [("grpc.ssl_target_name_override", t.server_name)] if t.server_name else []
        self.channel = grpc.secure_channel(t.addr, creds, options=opts)
        self._ready = threading.Event()
        self.channel.subscribe(self._state, try_to_connect=False)
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]

    def _state(self, s: grpc.ChannelConnectivity) -> None:
        if s is grpc.ChannelConnectivity.READY:
            self._ready.set()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: Callable[..., T], request: Any, *, hint: str = "", write: bool = False) -> T:
        """``method(request)``; a failure becomes CliError(one line, exit code). ``hint`` says which
        identity may do this (added to PERMISSION_DENIED)."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self.failure(e, hint=hint, write=write) from None

    def failure(self, e: grpc.RpcError, *, hint: str = "", write: bool = False) -> CliError:
        code: grpc.StatusCode = e.code()
        msg = " ".join(str(e.details() or "").split())
        S = grpc.StatusCode
        # UNAVAILABLE from gRPC itself (no connection, or it broke), not the CA's own (e.g. no database primary).
        local = msg.startswith(("failed to connect to all addresses", "errors resolving", "DNS resolution failed")) \
            or any(s in msg for s in ("Socket closed", "Connection reset", "Broken pipe", "GOAWAY"))
        if code is S.UNAVAILABLE and local:
            return CliError(f"cannot reach the CA at {self.target.addr}: {_why(msg, self.target)}", UNREACHABLE)
        if code is S.DEADLINE_EXCEEDED and "did not finish within its deadline" not in msg:
            state = "did not answer" if self._ready.is_set() else "could not be reached"
            return CliError(f"the CA at {self.target.addr} {state} within {self.timeout:g}s (--timeout); "
                            "check --addr/KEYWARD_CA_ADDR and that it runs", UNREACHABLE)
        who = f"identity {self.target.name!r}"
        outcome = classify(code.name)
        extra = {
            S.PERMISSION_DENIED: hint,
            S.UNAUTHENTICATED: f"the CA does not accept {who}: it needs a certificate from the platform CA "
                               "with one spiffe:// URI SAN (see docs/cli.md)",
            S.ABORTED: "someone changed it meanwhile: run the command again",
            S.UNAVAILABLE: (f"if the write may have happened, repeat with --request-id {self.request_id} "
                            "(the CA then returns the first result)") if write else "try again shortly",
            S.DEADLINE_EXCEEDED: (f"if the write may have happened, repeat with --request-id {self.request_id} "
                                  "(the CA then returns the first result)") if write else "try again shortly",
            S.RESOURCE_EXHAUSTED: "try again shortly",
        }.get(code, "")
        if outcome is Outcome.BROKEN and not extra:
            extra = "the CA failed: give its operators the ref in this message (its log has the details)"
        exit_code = RETRY if outcome is Outcome.RETRY else REFUSED
        return CliError(f"{code.name}: {msg or 'no detail'}" + (f"; {extra}" if extra else ""), exit_code)


def _why(msg: str, t: Target) -> str:
    """The useful end of a connection failure, with what to check."""
    if "handshake failed" in msg.lower():
        reason = msg.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK")
        return (f"TLS handshake failed: the CA's certificate does not verify against {t.cacert} ({reason}); "
                "give the platform CA's ca.crt (--cacert, KEYWARD_PKI_DIR), or --server-name for another address")
    if "Socket closed" in msg or "Connection reset" in msg:
        return (f"the CA closed the connection: it probably does not accept the client certificate {t.cert} "
                "(not issued by the platform CA?)")
    if "Connection refused" in msg:
        return "connection refused (is the CA running there? `make up`, or check --addr/KEYWARD_CA_ADDR)"
    return f"{msg} (check --addr/KEYWARD_CA_ADDR)"


def connect(a: argparse.Namespace) -> Conn:
    return Conn(resolve(a), a.timeout, getattr(a, "request_id", None))


def platform_hint() -> str:
    return "this needs the platform admin identity (--identity platform-admin)"


def org_hint(org: str) -> str:
    return f"use org {org!r}'s admin identity (--identity org-admin-{org}) or the platform admin's"


EXIT_CODES = """exit codes:
  0  done
  1  the CA refused or failed the request (its message says why), health is not SERVING,
     or the command failed unexpectedly
  2  usage or a local problem: no identity, a missing or malformed file, bad flags
  3  no answer from the CA: cannot connect, TLS handshake failed, or --timeout elapsed
  4  the CA cannot do it now (no database primary, busy, a concurrent change): run it again
     (a write with the same --request-id)"""


def leaf(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, *,
         example: str, ca: bool = True, write: bool = False, timeout: float = 30,
         description: str = "") -> argparse.ArgumentParser:
    """A command: its help, an example and the exit codes in its epilog, and (when it calls the CA)
    the connection options and the environment it reads."""
    env = ("\nenvironment: KEYWARD_CA_ADDR (--addr), KEYWARD_IDENTITY (--identity), "
           "KEYWARD_PKI_DIR (--pki-dir)") if ca else ""
    p = sub.add_parser(name, help=help, description=textwrap.fill(description or help, 92),
                       epilog=f"example:\n  {example}{env}\n{EXIT_CODES}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if ca:
        add_options(p, write=write, timeout=timeout)
    return p
