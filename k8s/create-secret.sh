#!/usr/bin/env bash
# The Secret the chart generates (and keeps across upgrades), for a plain-manifest install.
set -euo pipefail
ns=${1:-keyward}
rnd() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c "$1"; }
kubectl -n "$ns" create secret generic keyward-secrets \
  --from-literal=master-secret="$(rnd 64)" \
  --from-literal=postgres-password="$(rnd 32)" \
  --from-literal=replication-password="$(rnd 32)" \
  --from-literal=keyward-password="$(rnd 32)"
