"""An org's policy on the command line: the flags, the policy file (JSON, or YAML when PyYAML is
installed), applying flags to a policy, and showing a policy and what changed."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from common.policy import DEFAULT_IDLE_SECONDS
from control_plane.adminctl.connect import CliError
from control_plane.adminctl.output import fields
from protos.keyward.v1 import keyward_pb2 as pb

LISTS: tuple[tuple[str, str, str, str], ...] = (
    # flag, Policy field, metavar, help
    ("location-cidr", "location_cidrs", "CIDR", "a source network of the org's locations (how ZENs map traffic)"),
    ("block-host", "blocked_hosts", "HOST", "block a host (exact or *.suffix) with a 403 page"),
    ("block-url-prefix", "blocked_url_prefixes", "HOST/PATH", "block URLs starting with this"),
    ("do-not-inspect", "do_not_inspect_hosts", "HOST", "tunnel a host without decryption (banking, pinned apps)"),
    ("proxy-verifier", "proxy_credential_verifiers", "VERIFIER",
     "a proxy credential verifier from `keyward proxy-verifier` (users log in as ORG:secret)"),
    ("permit-dns", "permitted_dns_subtrees", "DOMAIN", "name constraint: the intermediate may only sign "
                                                       "names under DOMAIN (changes need a new key)"),
    ("exclude-dns", "excluded_dns_subtrees", "DOMAIN", "name constraint: never sign names under DOMAIN"),
)
FIELD = {flag: field for flag, field, _, _ in LISTS}
YAML_NOTE = ("FILE is JSON, or YAML when PyYAML is installed (it is not a keyward dependency): "
             "the Policy fields as in `keyward org policy get ORG -o json`")


def add_flags(p: argparse.ArgumentParser, *, removals: bool) -> None:
    g = p.add_argument_group("policy" + (" (flags change the current policy; the rest is kept)" if removals else ""))
    g.add_argument("--fail-mode", choices=("open", "closed"),
                   help="without the org's key a ZEN tunnels uninspected (open) or refuses (closed)")
    g.add_argument("--private-zen-only", action=argparse.BooleanOptionalAction, default=None,
                   help="keys go only to the org's private ZEN pools")
    g.add_argument("--idle-seconds", type=int, metavar="N",
                   help=f"a ZEN drops the key after N idle seconds (10..86400; 0: the default, {DEFAULT_IDLE_SECONDS})")
    for flag, field, metavar, text in LISTS:
        g.add_argument(f"--{flag}", action="append", default=[], metavar=metavar, dest=f"add_{field}",
                       help=text + " (repeatable)")
    if removals:
        for flag, field, metavar, _ in LISTS:
            g.add_argument(f"--remove-{flag}", action="append", default=[], metavar=metavar, dest=f"rm_{field}",
                           help=f"remove an entry given with --{flag} (repeatable)")
        g.add_argument("--clear", action="append", default=[], choices=[f for f, *_ in LISTS], metavar="LIST",
                       help="empty a list: " + ", ".join(f for f, *_ in LISTS) + " (repeatable)")


def has_flags(a: argparse.Namespace) -> bool:
    if a.fail_mode or a.private_zen_only is not None or a.idle_seconds is not None:
        return True
    return any(getattr(a, f"add_{f}") or getattr(a, f"rm_{f}", None) for _, f, _, _ in LISTS) or \
        bool(getattr(a, "clear", None))


def apply_flags(base: pb.Policy, a: argparse.Namespace) -> pb.Policy:
    """A copy of ``base`` with the flags applied: clears, then removals, then additions."""
    p = pb.Policy()
    p.CopyFrom(base)
    if a.fail_mode:
        p.fail_mode = pb.FAIL_MODE_CLOSED if a.fail_mode == "closed" else pb.FAIL_MODE_OPEN
    if a.private_zen_only is not None:
        p.private_zen_only = a.private_zen_only
    if a.idle_seconds is not None:
        if a.idle_seconds < 0:
            raise CliError("--idle-seconds must be 0 (the default) or 10..86400")
        p.key_idle_timeout_seconds = a.idle_seconds
    for flag, field, _, _ in LISTS:
        cur = list(getattr(p, field))
        if flag in (getattr(a, "clear", None) or []):
            cur = []
        for v in getattr(a, f"rm_{field}", None) or []:
            if v not in cur:
                raise CliError(f"--remove-{flag} {v}: not in the policy's {field} "
                               f"({', '.join(cur) or 'empty'})")
            cur.remove(v)
        for v in getattr(a, f"add_{field}"):
            if v not in cur:
                cur.append(v)
        del getattr(p, field)[:]
        getattr(p, field).extend(cur)
    return p


def load_file(path: str) -> pb.Policy:
    """A Policy from a JSON or YAML file (a bare Policy, or an object with a ``policy`` field such as
    ``keyward org get -o json`` prints). ``fail_mode`` may be ``open``/``closed``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CliError(f"cannot read policy file {path}: {e.strerror}") from None
    data: Any
    try:
        data = json.loads(text)
    except ValueError as je:
        try:
            yaml = importlib.import_module("yaml")  # optional (not a dependency), hence untyped
        except ImportError:
            raise CliError(f"{path} is not JSON ({je}); YAML needs PyYAML (pip install PyYAML), "
                           "which is not installed: write the policy as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as ye:
            raise CliError(f"{path} is neither JSON nor YAML: {' '.join(str(ye).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected an object of Policy fields (e.g. fail_mode, blocked_hosts)")
    if isinstance(data.get("policy"), dict):
        data = data["policy"]
    fm = data.get("fail_mode", data.get("failMode"))
    if isinstance(fm, str) and fm.lower() in ("open", "closed"):
        data.pop("failMode", None)
        data["fail_mode"] = f"FAIL_MODE_{fm.upper()}"
    p = pb.Policy()
    try:
        json_format.ParseDict(data, p)
    except json_format.ParseError as e:
        names = ", ".join(f.name for f in pb.Policy.DESCRIPTOR.fields)
        first = (str(e).strip().splitlines() or ["invalid"])[0]
        raise CliError(f"{path}: {first} (Policy fields: {names})") from None
    return p


def _show(p: pb.Policy, field: str) -> str:
    if field == "fail_mode":
        return pb.FailMode.Name(p.fail_mode)
    v = getattr(p, field)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v} (the default, {DEFAULT_IDLE_SECONDS})" if field == "key_idle_timeout_seconds" and v == 0 else str(v)
    return ", ".join(v) or "-"


def render(p: pb.Policy) -> str:
    return fields([(f.name, _show(p, f.name)) for f in pb.Policy.DESCRIPTOR.fields])


def _norm(p: pb.Policy) -> pb.Policy:
    q = pb.Policy()
    q.CopyFrom(p)
    q.key_idle_timeout_seconds = q.key_idle_timeout_seconds or DEFAULT_IDLE_SECONDS
    return q


def changes(old: pb.Policy, new: pb.Policy) -> list[str]:
    """What differs, one line per change: ``field: old -> new`` or ``field: + added`` / ``- removed``."""
    old, new = _norm(old), _norm(new)
    out = []
    for f in pb.Policy.DESCRIPTOR.fields:
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.is_repeated:
            lines = [f"{f.name}: + {v}" for v in b if v not in a] + [f"{f.name}: - {v}" for v in a if v not in b]
            if not lines and list(a) != list(b):
                lines = [f"{f.name}: reordered"]
            out += lines
        elif a != b:
            out.append(f"{f.name}: {_show(old, f.name)} -> {_show(new, f.name)}")
    return out
