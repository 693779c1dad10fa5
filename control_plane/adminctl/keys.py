"""``keyward key request|upload|list|revoke``: an org's intermediate CA key."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from control_plane.adminctl.connect import REFUSED, CliError, connect, leaf, org_hint
from control_plane.adminctl.output import add_output, enum, note, print_json, table, ts
from protos.keyward.v1 import keyward_pb2 as pb

ALGORITHMS = {
    "rsa-2048": pb.KEY_ALGORITHM_RSA_2048,
    "rsa-3072": pb.KEY_ALGORITHM_RSA_3072,
    "rsa-4096": pb.KEY_ALGORITHM_RSA_4096,
    "ec-p256": pb.KEY_ALGORITHM_EC_P256,
    "ec-p384": pb.KEY_ALGORITHM_EC_P384,
}


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    key = sub.add_parser("key", help="an organization's intermediate CA key",
                         description="The org's intermediate CA key: the CA generates and seals it, you sign "
                                     "its CSR with the org's root, upload the certificate, and ZENs get it.")
    ksub = key.add_subparsers(dest="key_cmd", required=True, metavar="COMMAND")

    p = leaf(ksub, "request", "have the CA generate a new key and write its CSR to a file", write=True,
             timeout=60, example="keyward key request acme --algorithm ec-p256   # writes ./acme.csr",
             description="The CA generates a new key (sealed at once; it never leaves the CA in the clear) and "
                         "returns a CSR for it, which this writes to --out (default ./ORG.csr). The key stays "
                         "pending until its signed certificate is uploaded; a newer request discards it.")
    p.add_argument("org", metavar="ORG")
    p.add_argument("--algorithm", choices=list(ALGORITHMS), default="rsa-2048", help="default: rsa-2048")
    p.add_argument("--common-name", default="", metavar="CN", help="default: 'ORG keyward intermediate'")
    p.add_argument("--organization", default="", metavar="O", help="default: the org's display name")
    p.add_argument("--out", metavar="FILE", help="where to write the CSR (default: ./ORG.csr; - for stdout)")
    add_output(p)
    p.set_defaults(run=request)

    p = leaf(ksub, "upload", "upload the signed intermediate: it becomes the active key", write=True,
             example="keyward key upload acme acme.crt --chain acme-root/root.crt",
             description="Upload the certificate signed from the CSR (CA:TRUE, pathlen:0, keyUsage keyCertSign, "
                         "the CSR's name constraints kept) with its issuer chain up to the org's self-signed root. "
                         "The key becomes ACTIVE and the previous one is rotated out (deleted).")
    p.add_argument("org", metavar="ORG")
    p.add_argument("cert", metavar="CERT", help="the signed intermediate, one PEM certificate")
    p.add_argument("--chain", required=True, metavar="FILE",
                   help="issuer certificates, nearest first, ending with the org's root (PEM)")
    add_output(p)
    p.set_defaults(run=upload)

    p = leaf(ksub, "list", "list an organization's keys (metadata only)", example="keyward key list acme")
    p.add_argument("org", metavar="ORG")
    add_output(p)
    p.set_defaults(run=list_keys)

    p = leaf(ksub, "revoke", "revoke a key: it is deleted and ZENs drop it now", write=True,
             example="keyward key revoke acme 3f1c9a4e-... --reason 'compromise drill'",
             description="Revoke a key by key id or certificate serial (hex, as `key list` shows). Its key and "
                         "certificate are deleted and every ZEN drops it; until a new key is active the org's "
                         "fail mode applies.")
    p.add_argument("org", metavar="ORG")
    p.add_argument("key", metavar="KEY_ID|SERIAL")
    p.add_argument("--reason", default="", help="recorded in the audit log (at most 200 characters)")
    add_output(p)
    p.set_defaults(run=revoke)


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def request(a: argparse.Namespace) -> int:
    out = None if a.out == "-" else Path(a.out or f"{a.org}.csr")
    if out is not None and not out.resolve().parent.is_dir():
        raise CliError(f"--out {out}: folder {out.resolve().parent} does not exist")
    with connect(a) as c:
        r = c.call(c.admin.RequestIntermediateCsr, pb.RequestIntermediateCsrRequest(
            org_id=a.org, algorithm=ALGORITHMS[a.algorithm], common_name=a.common_name,
            organization=a.organization, request_id=c.request_id), hint=org_hint(a.org), write=True)
    if out is None:
        print(r.csr_pem, end="")
        return 0
    try:
        out.write_text(r.csr_pem)
    except OSError as e:
        raise CliError(f"the CA made pending key {r.key_id}, but writing {out} failed ({e.strerror}); "
                       f"write it with --out -, or request again (which discards this pending key)") from None
    if a.output == "json":
        print_json(r)
        note(f"CSR of pending key {r.key_id} written to {out.resolve()}")
        return 0
    alg = enum(pb.KeyAlgorithm.Name(r.algorithm), "KEY_ALGORITHM_")
    print(f"pending key {r.key_id} ({alg}) of {a.org!r}: CSR written to {out.resolve()}\n"
          f"public key sha256: {r.public_key_sha256}\n"
          f"next: sign it with {a.org}'s root CA (CA:TRUE, pathlen:0, keyUsage keyCertSign, keeping its name "
          f"constraints), e.g. with a throwaway dev root:\n"
          f"  keyward dev org-root {a.org} && keyward dev sign {out}\n"
          f"then: keyward key upload {a.org} {out.with_suffix('.crt')} --chain {a.org}-root/root.crt")
    return 0


def upload(a: argparse.Namespace) -> int:
    cert, chain = _read(a.cert, "certificate"), _read(a.chain, "chain")
    with connect(a) as c:
        i = c.call(c.admin.UploadIntermediateCertificate, pb.UploadIntermediateCertificateRequest(
            org_id=a.org, certificate_pem=cert, chain_pem=chain, request_id=c.request_id),
            hint=org_hint(a.org), write=True)
    if a.output == "json":
        print_json(i)
        return 0
    print(f"key {i.key_id} of {i.org_id!r} is {enum(pb.IntermediateState.Name(i.state), 'INTERMEDIATE_STATE_')} "
          f"(version {i.version}, serial {i.serial_hex}, valid until {ts(i.not_after)}): "
          f"ZENs serving {i.org_id!r} get it from now on")
    return 0


def _rows(items: list[pb.Intermediate]) -> list[tuple[object, ...]]:
    return [(i.key_id, enum(pb.IntermediateState.Name(i.state), "INTERMEDIATE_STATE_"), i.version or "-",
             enum(pb.KeyAlgorithm.Name(i.algorithm), "KEY_ALGORITHM_"), i.serial_hex or "-", ts(i.not_after),
             ts(i.created_at), ts(i.ended_at)) for i in items]


def list_keys(a: argparse.Namespace) -> int:
    with connect(a) as c:
        r = c.call(c.admin.ListIntermediates, pb.ListIntermediatesRequest(org_id=a.org), hint=org_hint(a.org))
    if a.output == "json":
        print_json(r)
    else:
        print(table(["KEY ID", "STATE", "VERSION", "ALGORITHM", "SERIAL", "NOT AFTER", "CREATED", "ENDED"],
                    _rows(list(r.intermediates))))
    return 0


def _serial(s: str) -> str:
    s = s.lower().replace(":", "")
    return (s[2:] if s.startswith("0x") else s).lstrip("0")


def revoke(a: argparse.Namespace) -> int:
    with connect(a) as c:
        try:
            key_id = str(uuid.UUID(a.key))
        except ValueError:
            listed = c.call(c.admin.ListIntermediates, pb.ListIntermediatesRequest(org_id=a.org),
                            hint=org_hint(a.org))
            hits = [i.key_id for i in listed.intermediates if i.serial_hex and _serial(i.serial_hex) == _serial(a.key)]
            if len(hits) != 1:
                raise CliError(f"no key of {a.org!r} has key id or serial {a.key!r} "
                               f"(see keyward key list {a.org})", REFUSED) from None
            key_id = hits[0]
        i = c.call(c.admin.RevokeIntermediate, pb.RevokeIntermediateRequest(
            org_id=a.org, key_id=key_id, reason=a.reason, request_id=c.request_id), hint=org_hint(a.org), write=True)
    if a.output == "json":
        print_json(i)
    else:
        print(f"key {i.key_id} of {i.org_id!r} is {enum(pb.IntermediateState.Name(i.state), 'INTERMEDIATE_STATE_')}: "
              f"deleted, and ZENs drop it now; {i.org_id!r} has no active key until the next "
              f"`keyward key request {i.org_id}` is signed and uploaded")
    return 0
