"""Who may do what (pure). Every refusal is :class:`PermissionDenied`.

* platform admin: everything on the Admin service, for every org.
* org admin: the Admin calls on its own org only. Another org's id gets the
  same refusal whether or not that org exists (no oracle).
* ZEN pool: the KeyDistribution service only, for the orgs its pool serves
  (:func:`pool_serves`, the one rule; its SQL twin is the view
  ``pool_orgs_served`` in ``control_plane/store/schema.sql``), and only the
  key events whose audience, fixed when the event was written, names its
  pool (:func:`event_reaches`).
"""

from __future__ import annotations

from collections.abc import Collection

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


def pool_serves(visibility: str, bound_org_ids: Collection[str], org_id: str, private_zen_only: bool) -> bool:
    """THE rule: may a pool receive an org's keys? A public pool serves every org that
    is not private_zen_only; a private pool serves the orgs bound to it, and those only.

    Every query that asks it in SQL uses the view ``pool_orgs_served`` (schema.sql),
    the same rule; ``tests/control_plane/store/test_pools.py`` holds the two to one
    table of cases."""
    if visibility == "public":
        return not private_zen_only
    return org_id in bound_org_ids


def event_reaches(pool: str, audience: Collection[str]) -> bool:
    """May a pool's WatchKeys stream carry a key event? Only when the event is for it:
    its audience, fixed when it was written, holds the pools that served its org then
    (for ACCESS_REVOKED: the pools that lost it). Why that is right when bindings
    change afterwards: :mod:`control_plane.store.events`."""
    return pool in audience


def key_refusal(pool: str, org_id: str) -> PermissionDenied:
    """The one refusal for an org a pool may not receive keys of, whether it
    is private to other pools or does not exist at all."""
    err = PermissionDenied(
        f"ZEN pool {pool!r} may not receive keys of organization {org_id!r} "
        "(it is served by other pools only, or does not exist)"
    )
    err.org_id = org_id  # audited under that org, whichever field of the request named it
    return err
