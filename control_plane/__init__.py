"""The Central Authority (CA): key custody over gRPC, backed by Postgres.

Layers, innermost first (rules enforced by ``.importlinter``):

    errors, config, identity, policy, certs, custody   pure; no I/O libraries
    store                                              the only psycopg user
    events, metrics, logs                              process plumbing
    service                                            the only protobuf/grpc user
    server, cli                                        wiring

The CA never decrypts a key: it imports ``keylib.wrap`` only, and
``keylib.guard.forbid_unwrap`` makes ``keylib.unwrap`` unimportable here.
"""
