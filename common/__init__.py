"""What every keyward process shares (the CA, the ZEN and its signers, the bypass relay, the
operator, the backup agent): today its log format (:mod:`common.logs`).

It imports nothing of ours (no plane, no keylib, no grpc or psycopg): an import-linter contract
keeps it that way, so any process can use it without dragging a plane along.
"""
