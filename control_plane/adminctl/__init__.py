"""The admin command line: ``keyward org|key|pool|health|dev|completion`` and ``keyward audit list``.

A client of the CA's API (gRPC over mTLS), like grpcurl: it never touches the database, the
store, the service or key custody (an import-linter contract). Each command is one module:

    connect     identity, address, channel; a failed call as one line and an exit code
    output      -o table|json
    orgs        org create|get|list, org policy get|set (policy: the flags and the policy file)
    keys        key request|upload|list|revoke
    pools       pool list|register|bind|unbind|deregister
    audit       audit list, health
    dev         dev org-root|sign|org-admin (NOT FOR PRODUCTION; devstack.pki's code)
    completion  completion bash|zsh

docs/cli.md documents every command.
"""

from __future__ import annotations

import argparse
import sys

from control_plane.adminctl import audit, completion, dev, keys, orgs, pools
from control_plane.adminctl.connect import EXIT_CODES, REFUSED, CliError

EPILOG = f"""everyday admin commands (each has --help with an example):
  keyward org create|get|list            organizations (no ListOrganizations RPC: see org list --help)
  keyward org policy get|set             an org's policy; set merges flags into the current one
  keyward key request|upload|list|revoke an org's intermediate key
  keyward pool list|register|bind|unbind|deregister
  keyward audit list [ORG]               audit events (paged); keyward audit verify checks the chain in the DB
  keyward health                         the CA's grpc.health.v1 status
  keyward dev org-root|sign|org-admin    a throwaway org root, CSR signing, a dev org-admin identity
                                         (NOT FOR PRODUCTION)
  keyward completion bash|zsh            shell completion

environment (admin commands):
  KEYWARD_CA_ADDR   the CA's address HOST:PORT (--addr)
  KEYWARD_IDENTITY  identity NAME: NAME.crt and NAME.key in KEYWARD_PKI_DIR (--identity)
  KEYWARD_PKI_DIR   folder of identities and of ca.crt, the CA's trust anchor (--pki-dir)
  `make up` writes them (but KEYWARD_IDENTITY) to .run/env: source .run/env

{EXIT_CODES}

docs/cli.md documents every command."""


def register(root: argparse.ArgumentParser, sub: argparse._SubParsersAction[argparse.ArgumentParser],
             audit_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the admin commands to the ``keyward`` parser tree; each sets ``run``."""
    orgs.add(sub)
    keys.add(sub)
    pools.add(sub)
    audit.add_audit(audit_sub)
    audit.add_health(sub)
    dev.add(sub)
    completion.add(sub, root)


def run(a: argparse.Namespace) -> int:
    """Run an admin command: every failure is one line on stderr and an exit code, never a traceback."""
    try:
        code: int = a.run(a)
        return code
    except CliError as e:
        print(f"keyward: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug here, not the caller's: still one line
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"keyward: unexpected error ({type(e).__name__}: {first})", file=sys.stderr)
        return REFUSED
