"""data_plane.mint: the chain a client is sent (issue 12 point 7: chain_pem is used, not dead).

The CA accepts an intermediate signed by an issuing CA below the org's root (chain_pem holds
that CA and the root, nearest first). A ZEN that sent only leaf + intermediate left a client that
trusts the org's root (and nothing else) unable to build the path: the handshake failed with
"unable to get local issuer certificate". The ZEN now sends the issuers below the root; the root
itself, which the client trusts already, is not sent."""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from data_plane.mint import Minter, issuers_to_send
from data_plane.signer import Signer
from keylib.securemem import from_bytes

NOW = dt.datetime.now(dt.UTC)


def _ca(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
        pathlen: int | None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _signer(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Signer:
    """A signer process holding ``key`` (the intermediate ``cert``'s), as the ZEN starts one."""
    buf = from_bytes(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    try:
        return Signer.start(buf, _pem(cert))
    finally:
        buf.wipe()


def _handshake(server: ssl.SSLContext, root: x509.Certificate, host: str) -> x509.Certificate:
    """A TLS handshake in memory by a client that trusts ``root`` only (raises when it cannot
    verify the chain it is sent); the leaf."""
    client = ssl.create_default_context(cadata=_pem(root))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), done
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("levels", [1, 2])
def test_a_client_that_trusts_only_the_org_root_verifies_the_leaf(levels: int) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("org root", root_key, None, None)
    issuer = (root, root_key)
    chain = [root]
    if levels == 2:  # root -> issuing CA -> intermediate
        sub_key = ec.generate_private_key(ec.SECP256R1())
        sub = _ca("org issuing CA", sub_key, issuer, 1)
        issuer, chain = (sub, sub_key), [sub, root]
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca("org intermediate", inter_key, issuer, 0)
    signer = _signer(inter_key, inter)
    try:
        ctx = Minter().context_for("acme", "k1", signer, _pem(inter), "shop.example", [], chain_pem=_pem(*chain))
        leaf = _handshake(ctx, root, "shop.example")  # SSLCertVerificationError when the path is broken
    finally:
        signer.stop()
    assert leaf.issuer == inter.subject


def _pump(c: ssl.SSLObject, s: ssl.SSLObject, bios: tuple[ssl.MemoryBIO, ...]) -> None:
    """Handshake ``c`` with ``s`` in memory, then give the client what the server sent after it."""
    c_in, c_out, s_in, s_out = bios
    for _ in range(20):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        c.read()  # processes the session tickets
    assert c.version() == "TLSv1.3"


def test_a_client_gets_one_session_ticket_and_resumes_with_it() -> None:
    """One ticket per handshake (OpenSSL's default is two: mint.TICKETS), and it works: the
    client's next connection to the same leaf resumes (no certificate, no signature)."""
    key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("org root", key, None, None)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca("org intermediate", inter_key, (root, key), 0)
    signer = _signer(inter_key, inter)
    try:
        server = Minter().context_for("acme", "k1", signer, _pem(inter), "shop.example", [], chain_pem=_pem(root))
    finally:
        signer.stop()
    client = ssl.create_default_context(cadata=_pem(root))
    tickets: list[object] = []

    def seen(conn: object, direction: str, version: object, content_type: object, msg_type: object,
             data: bytes) -> None:
        if direction == "read" and msg_type == ssl._TLSMessageType.NEWSESSION_TICKET:  # type: ignore[attr-defined]
            tickets.append(msg_type)
    client._msg_callback = seen  # type: ignore[attr-defined]
    bios = (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    first = client.wrap_bio(bios[0], bios[1], server_hostname="shop.example")
    _pump(first, server.wrap_bio(bios[2], bios[3], server_side=True), bios)
    assert len(tickets) == 1 and first.session is not None and first.session.has_ticket
    assert not first.session_reused
    bios = (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    again = client.wrap_bio(bios[0], bios[1], server_hostname="shop.example", session=first.session)
    _pump(again, server.wrap_bio(bios[2], bios[3], server_side=True), bios)
    assert again.session_reused


def test_issuers_to_send() -> None:
    assert issuers_to_send("") == b""
    k = ec.generate_private_key(ec.SECP256R1())
    root = _ca("r", k, None, None)
    assert issuers_to_send(_pem(root)) == b""
    sub = _ca("s", ec.generate_private_key(ec.SECP256R1()), (root, k), 1)
    assert issuers_to_send(_pem(sub, root)) == _pem(sub).encode()  # the root is the client's, never sent


def test_the_intermediate_is_parsed_once_per_org_and_a_new_one_replaces_it() -> None:
    """Each leaf is still signed by the signer (the org key stays there); what the ZEN derives
    from the org's intermediate and its leaf key's encodings are kept per org, not per leaf."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("org root", root_key, None, None)
    inters = [_ca("org intermediate", k, (root, root_key), 0) for k in
              (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()))]
    minter = Minter()
    issuer = minter._issuer("acme", _pem(inters[0]), "")
    assert minter._issuer("acme", _pem(inters[0]), "") is issuer
    assert minter._issuer("acme", _pem(inters[1]), "") is not issuer  # a new intermediate: parsed anew
    minter.forget("acme")
    assert "acme" not in minter._issuers
