"""The cluster description, shared by the tools (a JSON file).

A node's ``datadir`` is known only where the tool runs beside the server
(the local stack, the tests, an operator with the volume); remote-only nodes
leave it empty and the tool does what SQL alone can do.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

_SIMPLE = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int
    datadir: str = ""
    netns: str = ""
    """Network namespace the server runs in when a tool starts it (``ip netns exec``): the
    fault campaign gives each server its own to cut links. Empty: the tool's own."""


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[Node, ...]
    passfile: str
    """libpq passfile holding the passwords of the users below."""
    dbname: str = "keyward"
    app_user: str = "keyward"
    superuser: str = "postgres"
    repl_user: str = "replicator"
    required_sync: int = 2
    """Standbys that must confirm each commit: 2 (no loss while one of the
    three survives with its data) or 1 (writes go on with one standby down)."""
    backup_dir: str = ""
    server_passfile: str = ""
    """The passfile as the servers see it, for the primary_conninfo the tools write into them
    (in Kubernetes the operator's file is not in the Postgres pods). Default: ``passfile``."""
    extra: dict[str, str] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the cluster spec (have {', '.join(n.name for n in self.nodes)})")

    def conninfo(self, node: Node, *, user: str | None = None, dbname: str | None = None,
                 application_name: str = "keyward-dbops", timeout: int = 3) -> str:
        return (f"host={node.host} port={node.port} dbname={dbname or self.dbname} user={user or self.superuser} "
                f"passfile={self.passfile} connect_timeout={timeout} application_name={application_name}")

    def replication_conninfo(self, upstream: Node, app_name: str) -> str:
        """What a standby named ``app_name`` uses to stream from ``upstream``."""
        return (f"host={upstream.host} port={upstream.port} user={self.repl_user} "
                f"passfile={self.server_passfile or self.passfile} "
                f"application_name={app_name} connect_timeout=3")

    def app_dsn(self, *, read_write: bool) -> str:
        hosts = ",".join(n.host for n in self.nodes)
        ports = ",".join(str(n.port) for n in self.nodes)
        attrs = "read-write" if read_write else "prefer-standby"
        return (f"host={hosts} port={ports} dbname={self.dbname} user={self.app_user} passfile={self.passfile} "
                f"connect_timeout=3 target_session_attrs={attrs}")

    def sync_names(self, primary: str) -> str:
        # Names such as "keyward-postgres-1" (a StatefulSet's pods) must be quoted.
        others = ", ".join(n.name if _SIMPLE.fullmatch(n.name) else f'"{n.name}"'
                           for n in self.nodes if n.name != primary)
        return f"ANY {self.required_sync} ({others})"

    @staticmethod
    def slot(node: Node) -> str:
        """The node's replication slot: slot names allow only [a-z0-9_]."""
        return node.name.lower().replace("-", "_").replace(".", "_")

    def dump(self, path: Path) -> None:
        d = asdict(self)
        path.write_text(json.dumps(d, indent=2))

    @classmethod
    def load(cls, path: Path | str) -> ClusterSpec:
        d = json.loads(Path(path).read_text())
        d["nodes"] = tuple(Node(**n) for n in d["nodes"])
        return cls(**d)
