"""Development stack helpers: real Postgres servers, dev PKI, local stack.

Used by ``make up``/``make demo`` and by the test suite. Nothing here is
imported by the CA or the ZEN at run time.
"""
