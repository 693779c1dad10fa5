#!/usr/bin/env bash
# The Kubernetes control plane for `make e2e`, built from Go modules and cached
# outside the clone, keyed by version: only a machine's first run builds.
#   kube-apiserver, kube-controller-manager, kube-scheduler, etcd: tests/e2e/kubebin (one go build, so
#   shared packages compile once); kwok: go install of sigs.k8s.io/kwok at KWOK_VERSION.
# Keep the versions in step with tests/e2e/cluster.py (KUBE_VERSION, KWOK_VERSION) and kubebin/go.mod.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBE_VERSION=v1.35.4
KWOK_VERSION=v0.8.0
DEST="${KEYWARD_KUBE_CACHE:-$HOME/.cache/keyward}/kube-${KUBE_VERSION}-kwok-${KWOK_VERSION}"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
have=1; for b in "${want[@]}"; do [ -x "$DEST/$b" ] || have=0; done
[ -s "$DEST/kwok-stages.yaml" ] || have=0
if [ "$have" = 1 ]; then echo "kube binaries: $DEST (cached)"; exit 0; fi
command -v go >/dev/null || { echo "make e2e needs Go 1.25+ to build the Kubernetes control plane once (then cached in ${DEST%/*}): install Go, or put it on PATH" >&2; exit 1; }
mkdir -p "$DEST.tmp"
start=$(date +%s)
echo "building kube-apiserver, kube-controller-manager, kube-scheduler ${KUBE_VERSION} and etcd (first run only; about 12 min on 2 cores)"
# The version the binaries report (helm's kubeVersion check, feature gates' emulation version), as
# Kubernetes' own build sets it.
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
ldv=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldv="$ldv -X $pkg.gitVersion=${KUBE_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor} -X $pkg.gitTreeState=clean"
done
(cd tests/e2e/kubebin && go build -trimpath -ldflags="-s -w $ldv" -o "$DEST.tmp/" ./cmd/...)
echo "building kwok ${KWOK_VERSION}"
GOBIN="$DEST.tmp" go install -trimpath -ldflags='-s -w' "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
# kwok's own "fast" stages (nodes Ready with a lease heartbeat; pods Ready, completed, deleted), from the
# module just built, so the stages always match the binary.
stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@${KWOK_VERSION}/kustomize/stage"
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
         pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  echo "---"; cat "$stages/$f"
done > "$DEST.tmp/kwok-stages.yaml"
for b in "${want[@]}"; do [ -x "$DEST.tmp/$b" ] || { echo "build left no $b" >&2; exit 1; }; done
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
echo "kube binaries built in $(( $(date +%s) - start )) s: $DEST"
