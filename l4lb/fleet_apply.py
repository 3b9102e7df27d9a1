"""Bringing the running model to a fleet's runtime state: the apply side of l4lb.cluster.

Operator.restore_state lays a whole RuntimeState on a model fresh from the config; a node
of a fleet must instead move from the state it runs to the next one the watch delivers
(or a full read after a reconnect), touching only what differs and leaving every other
backend, its connections and its health alone. `apply_difference(operator, old, new)`
does that with the operator's primitives (add_backend, drop_backend, Pool.set_state and
set_weight, Listener.route_pool and route_split), so a change arriving from etcd lands
exactly as the command would have made it locally.

For each backend or route whose entries differ, the wanted end is computed from the
config plus `new`, the same rule restore_state follows: a removed backend is gone unless
added again; a weight or an admin state (maint, draining) without an entry is the
config's (an admin state left behind is `up`, or `down` while its health check fails, as
`enable` does); a route without an entry is the config's pool or split. An entry that no
longer fits this node's config (unknown pool, listener, sni route) is logged as
cluster_entry_ignored and skipped: each node's config is its own.
"""
from __future__ import annotations

from . import vocab
from .address import parse_address
from .model import BackendState
from .sni import check_sni_pattern
from .state import RuntimeState, split_route_key

# The cause of backend_state_changed when a fleet's change (etcd) moved the backend.
CAUSE_CLUSTER = "cluster"


def changed_refs(old: RuntimeState, new: RuntimeState) -> list[str]:
    """POOL/BACKEND of every backend whose entries differ between the two states."""
    refs = {ref for section in ("backends", "added")
            for ref in set(getattr(old, section)) | set(getattr(new, section))
            if getattr(old, section).get(ref) != getattr(new, section).get(ref)}
    refs |= set(old.removed) ^ set(new.removed)
    return sorted(refs)


def changed_routes(old: RuntimeState, new: RuntimeState) -> list[str]:
    return sorted(k for k in set(old.listeners) | set(new.listeners)
                  if old.listeners.get(k) != new.listeners.get(k))


def apply_difference(operator, old: RuntimeState, new: RuntimeState) -> int:
    """Move the model from `old` to `new`; returns how many backends and routes were
    looked at. Never raises for an entry that does not fit: it is logged and skipped."""
    refs, routes = changed_refs(old, new), changed_routes(old, new)
    for ref in refs:
        try:
            _converge_backend(operator, ref, new)
        except (LookupError, ValueError) as exc:
            _ignored(operator, "backends", ref, exc)
    for key in routes:
        try:
            _converge_route(operator, key, new)
        except (LookupError, ValueError) as exc:
            _ignored(operator, "listeners", key, exc)
    return len(refs) + len(routes)


def _ignored(operator, section: str, key: str, exc: Exception) -> None:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    operator.log.warning("cluster_entry_ignored", section=section, key=key,
                         error=f"not in this node's config: {text}"
                         if isinstance(exc, LookupError) else text)


def _converge_backend(operator, ref: str, new: RuntimeState) -> None:
    pool_name, _, name = ref.partition("/")
    pool = operator.balancer.pools.get(pool_name)
    if pool is None:
        raise LookupError(f"pool '{pool_name}'")
    configured = next((b for b in pool.config.backends if b.name == name), None)
    added = new.added.get(ref)
    override = new.backends.get(ref, {})
    current = pool.backends.get(name)
    if added is None and (configured is None or ref in new.removed):
        if current is not None:
            operator.drop_backend(current)
        return
    address = added["address"] if added is not None else str(configured.address)
    weight = override.get("weight", added["weight"] if added is not None
                          else configured.weight)
    if current is not None and str(current.address) != address:
        operator.drop_backend(current)
        current = None
    if current is None:
        current = operator.add_backend(pool_name, name, parse_address(address), weight)
    if current.weight != weight:
        pool.set_weight(current, weight)
    admin = override.get("state")
    if admin is not None:
        if str(current.state) != admin:
            pool.set_state(current, BackendState(admin), CAUSE_CLUSTER)
        current.set_by = override.get("set_by", vocab.SET_BY_DEFAULT)
    elif str(current.state) in vocab.ADMIN_STATES:
        pool.set_state(current, BackendState.DOWN if current.health == "failing"
                       else BackendState.UP, CAUSE_CLUSTER)
        current.set_by = None


def _converge_route(operator, key: str, new: RuntimeState) -> None:
    listener_name, sni = split_route_key(key)
    listener = operator.balancer.listeners.get(listener_name)
    if listener is None:
        raise LookupError(f"listener '{listener_name}'")
    if sni is not None:
        sni = listener.find_sni_route(sni)          # KeyError: no such sni route here
    wanted = new.listeners.get(key) or _configured_route(listener.config, sni)
    pools = operator.balancer.pools
    for pool in wanted.get("split") or [wanted.get("pool")]:
        if pool not in pools:
            raise LookupError(f"pool '{pool}'")
    if listener.route(sni) == wanted:
        return
    if "split" in wanted:
        listener.route_split(dict(wanted["split"]), pools, sni=sni)
    else:
        listener.route_pool(wanted["pool"], pools, sni=sni)
    operator.log.info("listener_routed", listener=listener_name, sni=sni, route=wanted,
                      cause=CAUSE_CLUSTER)


def _configured_route(cfg, sni: str | None) -> dict:
    """The route a listener's config gives its default route or an sni pattern."""
    if sni is None:
        return {"split": dict(cfg.split)} if cfg.split else {"pool": cfg.pool}
    for pattern, pool in (cfg.sni or {}).items():
        if check_sni_pattern(pattern) == sni:
            return {"pool": pool}
    raise LookupError(f"sni route '{sni}'")
