#!/usr/bin/env bash
# k8s/keyward.yaml: the chart rendered with default values, for users without Helm;
# the ZenPool CRD (helm/keyward/crds/) first, so `kubectl apply` creates it before the ZenPools.
# The generated Secret is left out (it would hold random passwords); create it with
# k8s/create-secret.sh before applying.
set -euo pipefail
cd "$(dirname "$0")/.."
.tools/bin/helm template keyward helm/keyward --namespace keyward --include-crds \
  | .venv/bin/python -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d.get("kind") != "Secret"]
sys.stdout.write("# Rendered from helm/keyward (scripts/render-k8s.sh). Do not edit.\n")
sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
' > k8s/keyward.yaml
