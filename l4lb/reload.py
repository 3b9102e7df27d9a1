"""Reload: a pure plan from two configs and the running backends, then its apply.

`plan_reload` is a function of data only (no sockets, no loop, no model objects): given
the running config, what each running pool's backends are now (address, weight,
max_connections, including backends added at runtime) and the new config, it says what
is added, rebuilt, updated and removed, and the change lines the reply and the log show.
`apply_reload` carries a plan out on a running balancer, opening every new bind first so
that a bind that fails changes nothing.

What a plan promises, and apply keeps:
- a pool whose `algorithm` or `hash_key` changed is *rebuilt*: only its algorithm is new
  (Pool.reconfigure); its backends keep their Targets (connections, counters), states
  and health checks (issue 20 item 1);
- a backend the file drops is removed unless the operator added it at runtime (it lives
  in the state file); its connections finish on their own;
- a listener keeps its runtime (counters, connections) and the binds whose address stays;
- the operator's runtime changes (state file) are applied again on top of the new config,
  and the change lines say so: a weight the file changes while the state file keeps the
  operator's is reported as not applied (issue 21), never as taking effect;
- `[log]`, `global.max_connections` and `[resolvers]` changes take effect at once and are
  listed (a `[resolvers]` change has every hostname asked again).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .actions import OperationError
from .config import (Address, BackendConfig, Config, ConfigError, ListenerConfig, PoolConfig,
                     load_config)
from .log import configure_logging
from .vocab import worker_count

if TYPE_CHECKING:                      # the balancer imports this module
    from .balancer import Balancer


@dataclass(frozen=True)
class RunningBackend:
    """What a plan needs to know of a running backend."""
    address: Address
    weight: int
    max_connections: int
    backup: bool = False
    health_address: Address | None = None


@dataclass
class PoolPlan:
    cfg: PoolConfig
    action: str                                   # "add" | "rebuild" | "update"
    remove: list[str] = field(default_factory=list)          # backends the file dropped
    add: list[BackendConfig] = field(default_factory=list)   # backends the file added
    update: list[BackendConfig] = field(default_factory=list)  # address/weight/limit changed


@dataclass
class ListenerPlan:
    cfg: ListenerConfig
    added: bool
    open: list[str] = field(default_factory=list)     # binds to open
    close: list[str] = field(default_factory=list)    # binds to close


@dataclass
class ReloadPlan:
    config: Config
    pools: list[PoolPlan] = field(default_factory=list)
    listeners: list[ListenerPlan] = field(default_factory=list)
    listeners_removed: list[str] = field(default_factory=list)
    pools_removed: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # human-readable, in apply order


def plan_reload(current: Config, running: dict[str, dict[str, RunningBackend]],
                added_at_runtime: set[str], new: Config,
                overrides: dict[str, dict] | None = None) -> ReloadPlan:
    """The plan that moves a balancer running `current` (its pools' backends as in
    `running`: pool -> backend -> RunningBackend; `added_at_runtime`: "pool/backend" refs
    the operator added; `overrides`: the state file's "pool/backend" -> {weight, state},
    re-applied after the file) to `new`. The change lines say what takes effect. Pure."""
    plan = ReloadPlan(new)
    changes = plan.changes
    overrides = overrides or {}
    changes.extend(_global_changes(current, new))
    for name, pcfg in new.pools.items():
        old = current.pools.get(name)
        if old is None:
            plan.pools.append(PoolPlan(pcfg, "add"))
            changes.append(f"pool {name} added")
            continue
        rebuild = (old.algorithm, old.hash_key) != (pcfg.algorithm, pcfg.hash_key)
        pp = PoolPlan(pcfg, "rebuild" if rebuild else "update")
        plan.pools.append(pp)
        if rebuild:
            changes.append(f"pool {name} rebuilt")
        have = running.get(name, {})
        wanted = {b.name: b for b in pcfg.backends}
        for bname in have:
            if bname not in wanted and f"{name}/{bname}" not in added_at_runtime:
                pp.remove.append(bname)
                changes.append(f"backend {name}/{bname} removed")
        for bname, bcfg in wanted.items():
            now = have.get(bname)
            if now is None:
                pp.add.append(bcfg)
                changes.append(f"backend {name}/{bname} added")
                continue
            ref = f"{name}/{bname}"
            kept = overrides.get(ref, {}).get("weight")      # the operator's, re-applied
            weight = bcfg.weight if kept is None else kept
            moved = now.address != bcfg.address
            limit = now.max_connections != bcfg.max_connections
            backup = now.backup != bcfg.backup
            checked_at = now.health_address != bcfg.health_address
            if moved or limit or backup or checked_at or now.weight != bcfg.weight:
                pp.update.append(bcfg)
            if moved:
                changes.append(f"backend {ref} address {bcfg.address}")
            if now.weight != weight:
                changes.append(f"backend {ref} weight {weight}")
            was = current.pools[name].backends
            file_weight = next((b.weight for b in was if b.name == bname), None)
            if kept is not None and file_weight != bcfg.weight and bcfg.weight != kept:
                changes.append(f"backend {ref} weight {bcfg.weight} not applied: the state "
                               f"file keeps {kept} (set with `weight`)")
            if limit:
                changes.append(f"backend {ref} max_connections {bcfg.max_connections}")
            if backup:
                changes.append(f"backend {ref} backup {str(bcfg.backup).lower()}")
            if checked_at:
                changes.append(f"backend {ref} health_address {bcfg.health_address}")
    for name, lcfg in new.listeners.items():
        old = current.listeners.get(name)
        binds = [str(a) for a in lcfg.bind]
        if old is None:
            lp = ListenerPlan(lcfg, True, open=binds)
            changes.append(f"listener {name} added")
        else:
            was = [str(a) for a in old.bind]
            lp = ListenerPlan(lcfg, False, open=[b for b in binds if b not in was],
                              close=[b for b in was if b not in binds])
            changes.extend(_buffer_changes(old, lcfg, kept=any(b in binds for b in was)))
            changes.extend(f"listener {name}: bind {b} closed" for b in lp.close)
        changes.extend(f"listener {name}: bind {b} opened" for b in lp.open)
        plan.listeners.append(lp)
    for name in current.listeners:
        if name not in new.listeners:
            plan.listeners_removed.append(name)
            changes.append(f"listener {name} removed")
    for name in current.pools:
        if name not in new.pools:
            plan.pools_removed.append(name)
            changes.append(f"pool {name} removed")
    return plan


def _global_changes(old: Config, new: Config) -> list[str]:
    """Change lines of the settings applied at once: [log], global.max_connections and
    [resolvers]."""
    out = []
    for key in ("level", "format", "access"):
        was, now = getattr(old.log, key), getattr(new.log, key)
        if was != now:
            shown = str(now).lower() if isinstance(now, bool) else now
            out.append(f"log {key} {shown}")
    if old.global_.max_connections != new.global_.max_connections:
        out.append(f"global max_connections {new.global_.max_connections}")
    if old.global_.workers != new.global_.workers:
        was, now = worker_count(old.global_.workers), worker_count(new.global_.workers)
        if was == now:
            out.append(f"global workers {new.global_.workers} ({now} workers, as before)")
        else:
            out.append(f"global workers {new.global_.workers}: {now} new workers replace "
                       f"the {was} running (they finish their connections)")
    for key in ("nameservers", "min_ttl", "max_ttl", "retry", "timeout"):
        was, now = getattr(old.resolvers, key), getattr(new.resolvers, key)
        if was != now:      # every name is asked again at once (Resolver.configure)
            shown = ("[" + ", ".join(str(a) for a in now) + "]" if key == "nameservers"
                     else f"{now:g}")
            out.append(f"resolvers {key} {shown}")
    return out


def _buffer_changes(old: ListenerConfig, new: ListenerConfig, kept: bool) -> list[str]:
    """Change lines of rcvbuf/sndbuf. Backend sockets follow at once (they are sized when
    created), the binds kept are resized (Listening.retune_binds); a size set back to 0
    cannot give an open socket its autotuning back, which the line says."""
    out = []
    for key in ("rcvbuf", "sndbuf"):
        was, now = getattr(old, key), getattr(new, key)
        if was == now:
            continue
        if now:
            out.append(f"listener {new.name}: {key} {now}")
        elif kept:
            out.append(f"listener {new.name}: {key} 0 (autotuning) for backend sockets; "
                       f"client sockets keep {was} until the binds are reopened (restart)")
        else:
            out.append(f"listener {new.name}: {key} 0 (autotuning)")
    return out


def running_backends(balancer: "Balancer") -> dict[str, dict[str, RunningBackend]]:
    """The plan's view of a balancer's pools."""
    return {name: {b.name: RunningBackend(b.address, b.weight, b.max_connections, b.backup,
                                     b.health_address)
                   for b in pool}
            for name, pool in balancer.pools.items()}


async def reload_from_file(balancer: "Balancer", cause: str) -> list[str]:
    """Re-read the balancer's config file and apply it in place; returns the change
    lines. OperationError, with nothing changed, when the file is broken, a new bind cannot
    be opened or the balancer is shutting down (each logged as config_rejected).
    Connections in flight keep flowing, including those of removed backends and
    listeners."""
    path = balancer.config.path

    def rejection(errors: list[str], message: str) -> OperationError:
        balancer.log.error("config_rejected", path=str(path), cause=cause, errors=errors)
        return OperationError(message)

    if balancer.stopping:
        raise rejection(["shutting down"], "shutting down: reload refused")
    try:
        new = load_config(path)
    except ConfigError as exc:
        errors = [str(i) for i in exc.issues]
        raise rejection(errors, "config rejected, nothing changed: " + "; ".join(errors)) from None
    plan = plan_reload(balancer.config, running_backends(balancer),
                       set(balancer.runtime_state.added), new,
                       balancer.runtime_state.backends)
    try:
        await apply_reload(balancer, plan)
    except OSError as exc:
        raise rejection([str(exc)], f"reload failed: {exc}") from None
    for warning in new.warnings:               # deprecated keys, as at start
        balancer.log.warning("config_deprecated", warning=warning)
    balancer.log.info("config_reloaded", path=str(new.path), cause=cause, changes=plan.changes)
    return plan.changes + [f"warning: {w}" for w in new.warnings]


async def apply_reload(balancer: "Balancer", plan: ReloadPlan) -> None:
    """Carry `plan` out in the master, then have every worker carry out the same plan.
    Opens the new binds (and the metrics address) first: OSError when one fails, and
    nothing has changed. OperationError when a shutdown began while they were opening."""
    new = plan.config
    count = worker_count(new.global_.workers)
    if count != balancer.workers.count:
        balancer.workers.check_room(count)
    await balancer.metrics.prepare(new.metrics.listen)
    try:
        servers = await balancer.listening.open_binds(new)
    except BaseException:
        balancer.metrics.abort()
        raise
    if balancer.stopping:                # began while the binds were opening
        balancer.listening.close_binds(servers)
        balancer.metrics.abort()
        balancer.log.error("config_rejected", path=str(new.path), cause="shutdown",
                           errors=["shutting down"])
        raise OperationError("shutting down: reload refused")
    balancer.metrics.commit()
    opened = [(name, bind, group) for name, per in servers.items()
              for bind, group in per.items()
              if name not in balancer.listeners
              or balancer.listeners[name].servers.get(bind) is not group]
    apply_plan(balancer, plan, servers)
    balancer.workers.reload(opened)
    if count != balancer.workers.count:
        try:
            await balancer.workers.regenerate(count)
        except OSError as exc:
            plan.changes.append(f"error: global workers {new.global_.workers} not applied: "
                                f"{exc}; the {balancer.workers.count} running workers "
                                f"keep serving")
            balancer.log.error("workers_not_replaced", workers=count, error=str(exc))


def apply_plan(rt: "Runtime", plan: ReloadPlan, servers: dict) -> None:
    """The model's part of a reload, the same in the master and in each worker:
    `servers` holds, per listener of the new config, its binds' servers (the master's
    BindGroups, a worker's Acceptors)."""
    new = plan.config
    rt.config = new
    configure_logging(new.log.level, new.log.format)
    rt.set_access_log(new.log.access)
    rt.hub.max_connections = new.global_.max_connections
    rt.configure_resolvers(new.resolvers)
    for pp in plan.pools:
        if pp.action == "add":
            rt.pools[pp.cfg.name] = rt.create_pool(pp.cfg)
            continue
        pool = rt.pools[pp.cfg.name]
        pool.reconfigure(pp.cfg)
        for name in pp.remove:
            rt.operator.drop_backend(pool.backends[name])
        for bcfg in pp.add:
            rt.wire_backend(pool.add_backend(bcfg))
        for bcfg in pp.update:
            pool.update_backend(bcfg)
        rt.rewatch_pool(pool)
    listeners = rt.listeners
    for lp in plan.listeners:
        name = lp.cfg.name
        listener = listeners.get(name)
        if listener is None:
            listener = listeners[name] = rt.create_listener(lp.cfg)
        else:
            rt.retune_binds(listener, lp.cfg, servers[name])
            listener.configure(lp.cfg, rt.pools)
        rt.swap_binds(listener, servers[name])
    for name in plan.listeners_removed:
        rt.close_listener(listeners.pop(name))
    for name in plan.pools_removed:
        rt.remove_pool(rt.pools.pop(name))
    rt.operator.restore_state()
