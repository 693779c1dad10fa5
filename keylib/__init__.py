"""keylib: keyward's key-wrapping library, shared by the CA and the ZENs.

Contract
--------
* ``keylib.wrap``   seals a private key (CA side). It can only encrypt.
* ``keylib.unwrap`` opens a sealed key into locked memory (ZEN side only).
  The Central Authority never imports it: an import-linter contract forbids
  it and the CA process installs :func:`keylib.guard.forbid_unwrap` at start.
* ``keylib.kdf``    derives the per-key AES-256 key (the "password") from the
  master secret, in locked memory; it is never stored or sent. Also the master
  secret's check value (``master_check_value``), which is not secret: the CA
  and the ZENs compare theirs.
* ``keylib.securemem`` locked, non-dumpable, zero-on-release buffers.

The envelope format is version-tagged (:data:`FORMAT`); a ZEN refuses a
format it does not know rather than guessing.
"""

__version__ = "1.0.0"

#: Tag of the envelope format written by this version of the library.
FORMAT = "keyward-keylib/1"
