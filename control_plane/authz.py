"""Who may do what (pure). Every refusal is :class:`PermissionDenied`.

* platform admin: everything on the Admin service, for every org.
* org admin: the Admin calls on its own org only. Another org's id gets the
  same refusal whether or not that org exists (no oracle).
* ZEN pool: the KeyDistribution service only, for the orgs its pool serves:
  a public pool serves every org that is not private_zen_only; a private
  pool serves the orgs bound to it.
"""

from __future__ import annotations

from control_plane.errors import PermissionDenied
from control_plane.identity import Identity, Role


def require_admin_of(ident: Identity, org_id: str) -> None:
    if ident.role is Role.PLATFORM_ADMIN:
        return
    if ident.role is Role.ORG_ADMIN and ident.subject == org_id:
        return
    raise PermissionDenied(f"{ident} may not act on organization {org_id!r} (or it does not exist)")


def require_platform_admin(ident: Identity, what: str) -> None:
    if ident.role is not Role.PLATFORM_ADMIN:
        raise PermissionDenied(f"{ident} may not {what}: platform admins only")


def require_zen(ident: Identity) -> str:
    """Return the caller's pool name."""
    if ident.role is not Role.ZEN_POOL:
        raise PermissionDenied(f"{ident} is not a ZEN: key distribution serves ZEN pools only")
    return ident.subject


def key_refusal(pool: str, org_id: str) -> PermissionDenied:
    """The one refusal for an org a pool may not receive keys of, whether it
    is private to other pools or does not exist at all."""
    return PermissionDenied(
        f"ZEN pool {pool!r} may not receive keys of organization {org_id!r} "
        "(it is served by other pools only, or does not exist)"
    )
