"""The Central Authority (CA): key custody over gRPC, backed by Postgres.

Layers, innermost first (rules enforced by ``.importlinter``):

    errors, config, identity, policy, certs, custody   pure; no I/O libraries
    store                                              the only psycopg user
    events, metrics, logs                              process plumbing
    convert, calls, service                            the API: the only protobuf/grpc users
                                                       (conversions, the call wrapper, handlers)
    server, interceptors, cli                          wiring (adminctl: a gRPC client)

The CA never decrypts a key: it imports ``keylib.wrap`` only, and
``keylib.guard.forbid_unwrap`` makes ``keylib.unwrap`` unimportable here.
"""
