"""What every keyward process shares (the CA, the ZEN and its signers, the bypass relay, the
operator, the backup agent), each rule defined once:

* :mod:`common.logs` (and :mod:`common.stderr`): the one log format, JSON lines;
* :mod:`common.env`: reading settings (booleans, numbers, durations, host:port, files) and the
  one form of their errors;
* :mod:`common.metrics`: the Prometheus (and /healthz) endpoint, loopback unless told otherwise;
* :mod:`common.hardening`: no core dumps, not dumpable;
* :mod:`common.ids`: the form of an org id or pool name;
* :mod:`common.policy`: the idle default and host patterns, as both planes read a policy;
* :mod:`common.status`: what a failed call to the CA means to its clients (retry, refused, broken).

It imports nothing of ours (no plane, no keylib, no grpc or psycopg): an import-linter contract
keeps it that way, so any process can use it without dragging a plane along. (The public-key
fingerprint in a sealed key's associated data is keylib's: ``keylib.envelope.spki_sha256``.)
"""
