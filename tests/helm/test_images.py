"""The images' build context (.dockerignore) and what the Dockerfiles copy.

No Docker engine runs here, so the ignore file is read with Docker's rules
(patterns relative to the context root, ``**`` for any folders, a matching
folder excludes everything under it) and checked against the repository's
own files: nothing holding key material, virtualenvs or tools goes into the
context, and everything the Dockerfiles COPY does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        out.append((negate, re.compile(rx + r"\Z")))
    return out


def ignored(path: str) -> bool:
    """Docker's verdict for ``path`` (the last matching pattern wins; a matched folder takes its content)."""
    parts = path.split("/")
    verdict = False
    for negate, rx in _patterns():
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            verdict = not negate
    return verdict


def test_no_key_material_tools_or_virtualenv_goes_into_the_build_context() -> None:
    for path in (".venv/bin/python", ".run/pki/root.key", ".run/env", ".tools/bin/helm", ".git/config",
                 "tests/helm/test_chart.py", "bench/run.py", "docs/operator.md", "keylib/__pycache__/x.cpython-311.pyc",
                 ".mypy_cache/3.11/x.json", ".pytest_cache/v/x", "devstack/certs/dev.pem", "k8s/ca.key",
                 "control_plane/tls.crt", "protos/keyward/v1/keyward_pb2.py", "protos/keyward/v1/keyward_pb2_grpc.py",
                 "keyward.egg-info/PKG-INFO"):
        assert ignored(path), path
    # What git ignores (generated, local) stays out too, whatever the developer's tree holds.
    listed = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in listed if not ignored(p.rstrip("/"))] == []


def test_everything_the_dockerfiles_copy_is_in_the_context() -> None:
    sources = set()
    for df in (ROOT / "docker").glob("*.Dockerfile"):
        for line in df.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                sources.update(line.split()[1:-1])
    assert {"pyproject.toml", "protos", "keylib", "control_plane", "data_plane", "k8s"} <= sources
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for src in sources:
        files = [p for p in tracked if p == src or p.startswith(src + "/")]
        assert files, src
        assert [p for p in files if ignored(p)] == [], src


def _chart_images() -> set[str]:
    from tests.helm.test_chart import _env, render

    images = set()
    for d in render():
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                images.add(c["image"])
                images.update(v for k, v in _env(c).items() if k.endswith("_IMAGE"))  # the ZENs, via the operator
    return images


def test_readme_and_kind_e2e_load_every_image_the_chart_runs() -> None:
    images = _chart_images()
    assert {"keyward/ca:0.1.0", "keyward/zen:0.1.0", "keyward/operator:0.1.0", "postgres:16"} <= images
    readme = (ROOT / "README.md").read_text()
    for cmd in ("kind load docker-image ", "minikube image load "):
        line = next(x for x in readme.splitlines() if cmd in x)
        assert set(line.split(cmd, 1)[1].split()) == images, line
    # scripts/kind-e2e.sh derives its list from the chart: run those lines.
    script = (ROOT / "scripts" / "kind-e2e.sh").read_text()
    lines = [x for x in script.splitlines() if x.startswith(("TAG=", "PG_IMAGE=", "IMAGES="))]
    out = subprocess.run(["bash", "-c", "\n".join([*lines, 'printf "%s\\n" "${IMAGES[@]}"'])], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert set(out) == images
    assert 'kind load docker-image --name "$CLUSTER" "${IMAGES[@]}"' in script


def test_kind_e2e_script_is_sound_shell() -> None:
    script = ROOT / "scripts" / "kind-e2e.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout
    text = script.read_text()
    assert "trap cleanup EXIT" in text and "kind delete cluster" in text  # the cluster goes, whatever happened
    for step in ("\"$HELM\" install", "--wait", "wait --for=create", "port-forward", "Health/Check", " list)",
                 "scale zenpool/public --replicas=3", "uninstall"):
        assert step in text, step
