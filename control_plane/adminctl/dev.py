"""``keyward dev org-root|sign|org-admin``: a throwaway org root CA, the signing of an intermediate's
CSR with it, and a dev org-admin identity, for trying keyward without an org PKI.

NOT FOR PRODUCTION: a real org root lives offline (or in an HSM) and signs with its own tooling;
real identities come from the platform's PKI. The code is ``devstack.pki``'s."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cryptography import x509

from common.ids import ID_RE
from control_plane.adminctl.connect import CliError, leaf
from keylib.tlsid import cert_pem

NFP = "NOT FOR PRODUCTION"


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help=f"throwaway org root CA and CSR signing ({NFP})",
                         description=f"Development helpers, {NFP}: a throwaway org root CA, and signing an "
                                     "intermediate's CSR with it. A real org signs the CSR with its own root.")
    dsub = dev.add_subparsers(dest="dev_cmd", required=True, metavar="COMMAND")

    p = leaf(dsub, "org-root", f"make a throwaway root CA for an org ({NFP})", ca=False,
             example="keyward dev org-root acme          # writes ./acme-root/root.{crt,key}",
             description=f"Make a throwaway root CA for ORG ({NFP}: its key is unencrypted on disk): "
                         "DIR/root.crt and DIR/root.key. An existing one is kept unless --force.")
    p.add_argument("org", metavar="ORG")
    p.add_argument("--dir", metavar="DIR", help="where (default: ./ORG-root)")
    p.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    p.add_argument("--force", action="store_true", help="replace an existing root in DIR")
    p.set_defaults(run=org_root)

    p = leaf(dsub, "sign", f"sign an intermediate's CSR with a throwaway org root ({NFP})", ca=False,
             example="keyward dev sign acme.csr          # uses ./acme-root, writes ./acme.crt",
             description="Sign the CSR from `keyward key request` as the org's intermediate: its subject and key, "
                         "CA:TRUE pathlen:0, keyUsage keyCertSign+cRLSign, and the name constraints the CSR "
                         f"requests copied as they are (the CA checks all of these on upload). {NFP}.")
    p.add_argument("csr", metavar="CSR")
    p.add_argument("--root-dir", metavar="DIR", help="the root from `keyward dev org-root` (default: NAME-root "
                                                     "beside the CSR, else ./NAME-root; NAME: the CSR's file name "
                                                     "without .csr)")
    p.add_argument("--out", metavar="CERT", help="where to write the certificate (default: the CSR's path with .crt)")
    p.add_argument("--days", type=int, default=365, help="validity, capped by the root's (default 365)")
    p.set_defaults(run=sign)

    p = leaf(dsub, "org-admin", f"issue the identity org-admin-ORG from the dev platform CA ({NFP})", ca=False,
             example="keyward dev org-admin acme         # then: --identity org-admin-acme",
             description="Issue org-admin-ORG.crt/.key (spiffe://keyward/org-admin/ORG) into the dev PKI folder, "
                         "signed by its ca.key, which only the dev PKI of `make up` keeps there. In a real "
                         f"install the platform's PKI issues identities. {NFP}.")
    p.add_argument("org", metavar="ORG")
    p.add_argument("--pki-dir", metavar="DIR", help="the dev PKI (default: $KEYWARD_PKI_DIR)")
    p.set_defaults(run=org_admin)


def org_admin(a: argparse.Namespace) -> int:
    from devstack import pki

    if not ID_RE.fullmatch(a.org):
        raise CliError(f"{a.org!r} is not an org id: 3-63 lowercase letters, digits or '-', starting with a letter")
    d = a.pki_dir or os.environ.get("KEYWARD_PKI_DIR")
    if not d:
        raise CliError("set KEYWARD_PKI_DIR (`source .run/env` after `make up`) or give --pki-dir DIR")
    pki_dir = Path(d)
    if not (pki_dir / "ca.key").is_file():
        raise CliError(f"{pki_dir}/ca.key not found: only the dev PKI (`make up`) keeps its CA key there")
    try:
        pki.org_admin(pki_dir, a.org)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot issue org-admin-{a.org} in {pki_dir}: {getattr(e, 'strerror', None) or e}") from None
    print(f"{NFP}: issued {pki_dir}/org-admin-{a.org}.crt and .key (spiffe://keyward/org-admin/{a.org}); "
          f"use it with --identity org-admin-{a.org} (or KEYWARD_IDENTITY=org-admin-{a.org})")
    return 0


def org_root(a: argparse.Namespace) -> int:
    from devstack import pki

    if not ID_RE.fullmatch(a.org):
        raise CliError(f"{a.org!r} is not an org id: 3-63 lowercase letters, digits or '-', starting with a letter")
    d = Path(a.dir or f"{a.org}-root")
    if (d / "root.crt").exists() and not a.force:
        print(f"kept the existing root in {d.resolve()} (--force replaces it): {_subject(d / 'root.crt')}")
        return 0
    try:
        cert = pki.org_root(d, a.org, days=a.days)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot make the root in {d}: {getattr(e, 'strerror', None) or e}") from None
    print(f"{NFP}: throwaway root CA of {a.org!r} written to {d.resolve()}/root.crt and root.key "
          f"(unencrypted key)\n  subject: {cert.subject.rfc4514_string()}\n"
          f"next: keyward dev sign {a.org}.csr --root-dir {d}   (the CSR from `keyward key request {a.org}`)\n"
          f"clients of intercepted traffic must trust {d}/root.crt")
    return 0


def _subject(crt: Path) -> str:
    try:
        return x509.load_pem_x509_certificate(crt.read_bytes()).subject.rfc4514_string()
    except (OSError, ValueError):
        return "(unreadable)"


def sign(a: argparse.Namespace) -> int:
    from devstack import pki

    csr_path = Path(a.csr)
    try:
        csr_pem = csr_path.read_bytes()
    except OSError as e:
        raise CliError(f"cannot read CSR {csr_path}: {e.strerror} (make one with `keyward key request ORG`)") from None
    stem = csr_path.name.removesuffix(".csr")
    beside = csr_path.parent / f"{stem}-root"
    root_dir = Path(a.root_dir) if a.root_dir else beside if (beside / "root.crt").exists() else Path(f"{stem}-root")
    try:
        root, root_key = pki.load_root(root_dir)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the root from {root_dir} (root.crt, root.key): "
                       f"{getattr(e, 'strerror', None) or e}; make one with `keyward dev org-root ORG --dir "
                       f"{root_dir}` or give --root-dir") from None
    try:
        cert = pki.sign_intermediate(csr_pem, root, root_key, days=a.days)
    except ValueError as e:
        raise CliError(f"{csr_path}: {e}") from None
    out = Path(a.out) if a.out else csr_path.with_name(stem + ".crt")
    try:
        out.write_bytes(cert_pem(cert))
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror}") from None
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        names = (f"permitted {[g.value for g in nc.permitted_subtrees or ()]}, "
                 f"excluded {[g.value for g in nc.excluded_subtrees or ()]}")
    except x509.ExtensionNotFound:
        names = "none"
    print(f"signed {csr_path} with {NFP} root {root.subject.rfc4514_string()!r}: {out.resolve()}\n"
          f"  subject {cert.subject.rfc4514_string()}, serial {cert.serial_number:x}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d}\n"
          f"  CA:TRUE pathlen:0, keyUsage keyCertSign cRLSign; name constraints: {names}\n"
          f"next: keyward key upload {stem if ID_RE.fullmatch(stem) else 'ORG'} {out} --chain {root_dir}/root.crt")
    return 0
