"""Kubernetes side of keyward: plain manifests (keyward.yaml) and the operator package."""
