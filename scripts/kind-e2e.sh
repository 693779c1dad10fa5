#!/usr/bin/env bash
# keyward on a real kind cluster, end to end, for users with a Docker engine (not run in CI: no
# Docker engine there). It proves what `make e2e` cannot: real container images and kubelets, the
# CNI and kube-proxy (Services, NetworkPolicy where the CNI enforces it), a real storage provisioner.
#
#   kind create cluster -> make images -> kind load (keyward images and postgres) -> helm install --wait
#   -> wait for the operator's admin identity -> grpcurl through kubectl port-forward (Health/Check, list)
#   -> kubectl scale zenpool/public --replicas=3 -> readyReplicas 3 -> helm upgrade keeps 3
#   -> helm uninstall (the CRD stays) -> kind delete cluster (always, also on failure).
#
# Needs: docker, kind, and `make tools venv` (helm, kubectl 1.31+ and grpcurl in .tools/bin and .venv/bin).
# Settings (environment): KIND_CLUSTER (keyward-e2e), NAMESPACE (keyward), RELEASE (keyward),
# CA_PORT (local port for the CA, 50051), KEEP_CLUSTER=1 to leave the cluster running at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-keyward-e2e}
NS=${NAMESPACE:-keyward}
RELEASE=${RELEASE:-keyward}
CA_PORT=${CA_PORT:-50051}
TAG=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/keyward/Chart.yaml)
PG_IMAGE=$(sed -n 's/^  image: *\(postgres:.*\)$/\1/p' helm/keyward/values.yaml)
IMAGES=("keyward/ca:${TAG}" "keyward/zen:${TAG}" "keyward/operator:${TAG}" "${PG_IMAGE}")
HELM=.tools/bin/helm
KUBECTL=.tools/bin/kubectl
GRPCURL=.venv/bin/grpcurl
# The chart's fullname (helm/keyward/templates/_helpers.tpl).
if [[ $RELEASE == *keyward* ]]; then FULL=${RELEASE:0:40}; else FULL="${RELEASE}-keyward"; FULL=${FULL:0:40}; fi
FULL=${FULL%-}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'kind-e2e: %s\n' "$*" >&2; exit 1; }

for tool in docker kind; do
  command -v "$tool" >/dev/null || die "$tool is needed (a Docker engine and kind)"
done
[[ -x $HELM && -x $KUBECTL ]] || make tools
[[ -x $GRPCURL ]] || make venv
[[ -n $TAG && -n $PG_IMAGE ]] || die "cannot read the image tag or the postgres image from the chart"

work=$(mktemp -d)
export KUBECONFIG="$work/kubeconfig"  # the cluster's own: the user's ~/.kube/config is left alone
pf_pid=""
cleanup() {
  local rc=$?
  if [[ -n $pf_pid ]]; then kill "$pf_pid" 2>/dev/null || true; fi
  if [[ $rc -ne 0 ]] && [[ -s $KUBECONFIG ]]; then
    echo "kind-e2e: failed (exit $rc); the release's pods and recent events:" >&2
    "$KUBECTL" -n "$NS" get pods -o wide >&2 || true
    "$KUBECTL" -n "$NS" get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
  fi
  if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
    echo "kind-e2e: cluster ${CLUSTER} kept (KUBECONFIG=${KUBECONFIG})" >&2
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT

k() { "$KUBECTL" -n "$NS" "$@"; }

# Retry "$@" every 2 s until it succeeds or $1 seconds pass.
retry() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 2
  done
}

say "kind cluster ${CLUSTER}"
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s

say "images: ${IMAGES[*]}"
make images
docker image inspect "$PG_IMAGE" >/dev/null 2>&1 || docker pull "$PG_IMAGE"
kind load docker-image --name "$CLUSTER" "${IMAGES[@]}"

say "helm install ${RELEASE} (namespace ${NS}, PodSecurity restricted enforced)"
"$KUBECTL" create namespace "$NS"
"$KUBECTL" label namespace "$NS" pod-security.kubernetes.io/enforce=restricted
"$HELM" install "$RELEASE" helm/keyward --namespace "$NS" --wait --timeout 10m

say "the operator's admin identity"
k wait --for=create "secret/${FULL}-admin-tls" --timeout=180s
for f in tls.crt tls.key ca.crt; do
  k get secret "${FULL}-admin-tls" -o "jsonpath={.data.${f//./\\.}}" | base64 -d > "$work/admin-$f"
done
chmod 600 "$work/admin-tls.key"

say "grpcurl through kubectl port-forward to svc/${FULL}-ca"
k port-forward "svc/${FULL}-ca" "${CA_PORT}:50051" > "$work/port-forward.log" 2>&1 &
pf_pid=$!
G=("$GRPCURL" -cacert "$work/admin-ca.crt" -cert "$work/admin-tls.crt" -key "$work/admin-tls.key"
   -authority "${FULL}-ca" "localhost:${CA_PORT}")
serving() {
  "${G[@]}" -d '{"service": "keyward.v1.KeyDistribution"}' grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING
}
retry 180 serving || die "the CA never answered SERVING (port-forward log: $(cat "$work/port-forward.log"))"
"${G[@]}" -d '{"service": "keyward.v1.KeyDistribution"}' grpc.health.v1.Health/Check
services=$("${G[@]}" list)
echo "$services"
grep -q '^keyward\.v1\.KeyDistribution$' <<<"$services" || die "the CA does not list keyward.v1.KeyDistribution"

say "zenpool/public: ready, then scaled to 3"
ready() { [[ $(k get zenpool/public -o 'jsonpath={.status.readyReplicas}') == "$1" ]]; }
retry 300 ready 2 || die "zenpool/public never had 2 ready ZENs"
k scale zenpool/public --replicas=3
retry 300 ready 3 || die "zenpool/public never had 3 ready ZENs"
k get zenpools

say "helm upgrade with unchanged values keeps the scaled count"
"$HELM" upgrade "$RELEASE" helm/keyward --namespace "$NS" --wait --timeout 10m
[[ $(k get zenpool/public -o 'jsonpath={.spec.replicas}') == 3 ]] || die "helm upgrade reset zenpool/public's replicas"

say "helm uninstall (within 60 s), the CRD stays, the namespace goes"
kill "$pf_pid" 2>/dev/null || true
pf_pid=""
"$HELM" uninstall "$RELEASE" --namespace "$NS" --wait --timeout 60s
"$KUBECTL" get crd zenpools.keyward.io >/dev/null || die "the ZenPool CRD went with the release"
"$KUBECTL" delete namespace "$NS" --timeout=120s

say "kind-e2e: passed"
