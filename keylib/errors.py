"""keylib's error tree. Messages name what failed and never hold key material."""


class KeylibError(Exception):
    """Base of every keylib error."""


class SecureMemoryError(KeylibError):
    """Locked memory could not be had or used."""


class EnvelopeError(KeylibError):
    """A sealed key is malformed, of an unknown format, or fails to open
    (wrong org, key id, public key, master secret, or tampered bytes)."""


class MasterSecretError(KeylibError):
    """The master secret is missing or too short."""
