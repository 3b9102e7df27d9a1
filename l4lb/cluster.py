"""A node of a fleet: the master's etcd client (DESIGN.md §10, issue 17).

Theory of operation
-------------------
Nodes share intent, never per-connection state (Maglev §3, GitHub GLB, Katran): every
node runs the same admin states, weights, added and removed backends and routes, and
computes the same choice from them. Those live in etcd (keys: l4lb.fleet_keys).

- **Writes.** An operator command acts on the local model as it always does; the
  operator's hook (Operator._saved) then hands the difference between what this node
  had applied from etcd and what it now runs to `publish`, which writes it in one
  transaction whose keys must not have changed since the revision this node applied
  (compare mod_revision < applied + 1). The reply comes once the local watch has applied
  the transaction's revision. A transaction etcd refused (a racing writer) or could not
  take (etcd unreachable) undoes the local change and the reply says why: a fleet never
  holds a change on one node only.
- **Applies.** One watch over PREFIX/v1/ from the applied revision on. The events of one
  watch response (one revision: a transaction is never split) are applied together on
  the next loop iteration: the keys become a RuntimeState by the state file's rules
  (fleet_keys.state_of), and fleet_apply.apply_difference moves the model to it with the
  operator's primitives. The state and its revision are saved in the local state file.
- **Liveness.** Each node puts PREFIX/v1/nodes/NODE under its own lease (lease_ttl),
  refreshed every lease_ttl / 3: name, pid, applied revision, heartbeat time and its
  backends' active connections (Backend.active). It is put again at once after a state
  change was applied and, at most every PUBLISH_INTERVAL, when its counts changed. A node
  that stops refreshing is deleted by etcd when its lease expires; the watch tells the
  others. `--fleet` and a fleet `wait` count the live nodes only.
- **Fail static.** etcd unreachable: the node keeps serving what it applied last (also in
  its state file, with the revision, for a restart meanwhile); writes fail with the cause;
  the session is retried with a capped backoff. A new session resumes the watch from the
  applied revision; when etcd compacted past it (RevisionCompactedError) it reads the
  whole prefix again and applies the difference.

Not covered: a node's own config (listeners, pools) is its own; an entry naming a pool
this node lacks is logged (cluster_entry_ignored) and skipped here.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import time

from . import fleet_keys
from .actions import OperationError
from .fleet_apply import apply_difference
from .state import RuntimeState, split_route_key

# Seconds one etcd call may take before it counts as failed (etcd answers a healthy
# loopback call in well under a millisecond).
RPC_TIMEOUT = 2.0
# Seconds between two tries to reach etcd: doubled per failed try, up to the max.
RETRY_MIN = 0.2
RETRY_MAX = 2.0
# Seconds between two looks at this node's active counts (a change is published then).
PUBLISH_INTERVAL = 0.2
# Seconds a write waits for the local watch to deliver its own revision.
APPLY_TIMEOUT = 10.0
# Seconds between two looks at the live nodes while `--fleet` or `wait` waits on them.
FLEET_POLL = 0.05
# A new channel per session reconnects at once; gRPC's own backoff (up to 120 s) would
# keep a node off etcd long after it came back.
GRPC_OPTIONS = {"grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000}


class Cluster:
    """This node's membership in a fleet: the etcd session, the watch, the node record."""

    def __init__(self, balancer, cfg):
        self.balancer = balancer
        self.operator = balancer.operator
        self.log = balancer.log
        self.cfg = cfg
        self.node = cfg.node
        self.root = fleet_keys.root(cfg.prefix)
        self.state_root = fleet_keys.state_root(cfg.prefix)
        self.node_key = fleet_keys.node_key(cfg.prefix, cfg.node)
        self.endpoints = list(cfg.etcd)
        self.client = None
        self.connected = False
        self.error: str | None = "not connected yet"
        self.endpoint = str(self.endpoints[0])
        self.entries: dict[str, bytes] = {}       # state keys (below state_root) as applied
        self.applied = RuntimeState()               # the state as applied from etcd
        self.revision = 0                           # the last revision applied
        self.state_revision = 0                     # the last revision that changed state
        self.nodes: dict[str, dict] = {}            # live nodes' records, from the watch
        self._pending: list = []                    # watch events not yet applied
        self._flush_scheduled = False
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._publish_now = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lease = None
        self._was_connected = False                 # the last session got as far as its watch
        self._compacted = False                     # etcd compacted past `revision`: read all
        self._published: tuple = (None, None)       # (applied, active) of the last record put

    # --- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        """Begin with the state the node restored from its state file (it serves that
        until etcd answers), then keep a session with etcd for as long as it runs."""
        state = self.balancer.runtime_state
        self.revision = self.state_revision = state.revision
        self.applied = copy.deepcopy(state)
        self.entries = fleet_keys.entries_of(state)
        self._task = self.balancer.loop.create_task(self._run())

    async def stop(self) -> None:
        """Leave the fleet: the node record goes at once (its lease revoked), then the
        session ends."""
        client, lease = self.client, self._lease
        if client is not None and lease is not None and self.connected:
            # Failing, it expires after lease_ttl instead.
            await _bounded(client.revoke_lease(lease.id), RPC_TIMEOUT)
        if self._task is not None:
            self._task.cancel()
            await _bounded(self._task, RPC_TIMEOUT)
        self.connected = False

    # --- the session --------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RETRY_MIN
        attempt = 0
        while True:
            endpoint = self.endpoints[attempt % len(self.endpoints)]
            attempt += 1
            try:
                await self._session(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:               # every etcd/gRPC failure: fail static
                self._lost(endpoint, exc)
            if self._was_connected:
                delay = RETRY_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _session(self, endpoint) -> None:
        import aetcd                                # the master's only: workers never load it
        from aetcd.exceptions import RevisionCompactedError

        self._was_connected = False
        self.endpoint = str(endpoint)
        client = aetcd.Client(endpoint.host, endpoint.port, timeout=RPC_TIMEOUT,
                              options=GRPC_OPTIONS)
        self.client = client
        try:
            await client.connect()
            self._lease = await client.lease(max(2, round(self.cfg.lease_ttl)))
            how = "first" if not self.revision else await self._resume_how(client)
            if how != "resumed":
                await self._resync(client, how)
            else:
                await self._read_nodes(client)      # the live nodes, not only later changes
            self._compacted = False
            watch = await client.watch_prefix(self.root.encode(),
                                              start_revision=self.revision + 1)
            self.connected, self.error, self._was_connected = True, None, True
            self.log.info("cluster_connected", node=self.node, endpoint=self.endpoint,
                          revision=self.revision, how=how)
            await self._put_record(client)
            tasks = [asyncio.ensure_future(self._consume(watch)),
                     asyncio.ensure_future(self._heartbeat(client))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()                   # the failure that ended the session
                raise ConnectionError("the watch ended")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except RevisionCompactedError:
            self._compacted = True                  # compacted since the probe: read again
            raise
        finally:
            self.connected = False
            self.client = None
            await self._close(client)

    async def _resume_how(self, client) -> str:
        """How a session can go on from the applied revision: "resumed" (the watch takes
        it from there), "compacted" (etcd compacted the history past it) or "behind"
        (etcd's revision is below it: a store rebuilt from scratch). Both of the latter
        read everything again."""
        from aetcd import rpc

        if self._compacted:
            return "compacted"
        probe = rpc.RangeRequest(key=self.root.encode(), limit=1, keys_only=True)
        current = (await client.kvstub.Range(probe, timeout=RPC_TIMEOUT,
                                             metadata=client.metadata)).header.revision
        if current < self.revision:
            return "behind"
        if current == self.revision:
            return "resumed"
        # A read at the next revision fails when it was compacted away.
        probe.revision = self.revision + 1
        try:
            await client.kvstub.Range(probe, timeout=RPC_TIMEOUT, metadata=client.metadata)
        except rpc.AioRpcError as exc:
            if "compacted" in (exc.details() or ""):
                return "compacted"
            raise
        return "resumed"

    @staticmethod
    async def _close(client) -> None:
        await _bounded(client.close(), RPC_TIMEOUT)

    def _lost(self, endpoint, exc: Exception) -> None:
        cause = _cause(exc)
        was = self.error
        self.error = f"etcd {endpoint}: {cause}"
        if was != self.error:
            self.log.warning("cluster_disconnected", node=self.node, endpoint=str(endpoint),
                             error=cause, revision=self.revision)

    async def _read_nodes(self, client) -> None:
        head = fleet_keys.node_key(self.cfg.prefix, "")
        got = await client.get_prefix(head.encode())
        self.nodes = {kv.key.decode("utf-8", "replace")[len(head):]: _record(kv.value)
                      for kv in got}

    async def _resync(self, client, how: str) -> None:
        """Read the whole prefix and apply the difference (first contact, or the watch's
        revision was compacted away)."""
        got = await client.get_prefix(self.root.encode())
        entries, nodes = {}, {}
        for kv in got:
            key = kv.key.decode("utf-8", "replace")
            if key.startswith(self.state_root):
                entries[key[len(self.state_root):]] = kv.value
            elif (name := fleet_keys.node_of(self.cfg.prefix, key)) is not None:
                nodes[name] = _record(kv.value)
        self.entries, self.nodes = entries, nodes
        self.revision = got.header.revision
        self.state_revision = max([kv.mod_revision for kv in got
                                   if kv.key.startswith(self.state_root.encode())] or [0])
        changes = self._apply_entries()
        self.log.info("cluster_resynced", node=self.node, revision=self.revision, how=how,
                      changes=changes)

    # --- applying the watch -------------------------------------------------------------

    async def _consume(self, watch) -> None:
        async for event in watch:
            self._pending.append(event)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.balancer.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Apply the events received so far: whole revisions, since one watch response
        (one revision) is queued before this runs."""
        self._flush_scheduled = False
        events, self._pending = self._pending, []
        try:
            self._apply_events(events)
        except Exception:                          # a bug: the next session reads it all
            self.log.exception("cluster_apply_failed")
            self._compacted = True
            if self.client is not None:
                self.balancer.loop.create_task(self._close(self.client))

    def _apply_events(self, events) -> None:
        state_changed = False
        for event in events:
            key = event.kv.key.decode("utf-8", "replace")
            put = event.kind == "PUT"
            if key.startswith(self.state_root):
                sub = key[len(self.state_root):]
                if put:
                    self.entries[sub] = event.kv.value
                else:
                    self.entries.pop(sub, None)
                state_changed = True
                self.state_revision = max(self.state_revision, event.kv.mod_revision)
            elif (name := fleet_keys.node_of(self.cfg.prefix, key)) is not None:
                if put:
                    if name not in self.nodes:
                        self.log.info("cluster_node_joined", node=name)
                    self.nodes[name] = _record(event.kv.value)
                elif self.nodes.pop(name, None) is not None:
                    self.log.info("cluster_node_left", node=name)
            self.revision = max(self.revision, event.kv.mod_revision)
        if state_changed:
            self._apply_entries()
            self._publish_now.set()
        self._wake_waiters()

    def _apply_entries(self) -> int:
        new = fleet_keys.state_of(self.entries)
        for issue in new.issues:
            self.log.warning("cluster_entry_ignored", section=issue.section, key=issue.key,
                             error=issue.message)
        new.issues = []
        old = self.balancer.runtime_state
        changes = apply_difference(self.operator, old, new)
        self.balancer.workers.converge(old, new)     # the workers' models follow
        new.revision = self.revision
        self.applied = copy.deepcopy(new)
        self.balancer.runtime_state = new
        self.balancer.state_writer.save()          # failures are logged by the writer
        return changes

    def _wake_waiters(self) -> None:
        keep = []
        for revision, fut in self._waiters:
            if fut.done():
                continue
            if self.revision >= revision:
                fut.set_result(True)
            else:
                keep.append((revision, fut))
        self._waiters = keep

    async def _until_applied(self, revision: int) -> bool:
        if self.revision >= revision:
            return True
        fut = self.balancer.loop.create_future()
        self._waiters.append((revision, fut))
        try:
            await asyncio.wait_for(fut, APPLY_TIMEOUT)
            return True
        except asyncio.TimeoutError:
            return self.revision >= revision

    # --- the node record ----------------------------------------------------------------

    def active_counts(self) -> dict[str, int]:
        return {b.ref: b.active for p in self.balancer.pools.values() for b in p if b.active}

    def _record(self) -> dict:
        return {"node": self.node, "pid": os.getpid(), "applied": self.revision,
                "heartbeat": time.time(), "active": self.active_counts()}

    async def _put_record(self, client) -> None:
        record = self._record()
        await client.put(self.node_key.encode(), fleet_keys.encode(record), lease=self._lease)
        self._published = (record["applied"], record["active"])

    async def _heartbeat(self, client) -> None:
        """Keep the lease alive (every lease_ttl / 3) and the record current."""
        every = self.cfg.lease_ttl / 3
        last = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._publish_now.wait(), PUBLISH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            forced = self._publish_now.is_set()
            self._publish_now.clear()
            now = time.monotonic()
            if now - last >= every:
                reply = await self._lease.refresh()
                if reply is None or reply.TTL <= 0:
                    raise ConnectionError("the node's lease expired")
                last = now
                await self._put_record(client)
            elif forced or self._published[1] != self.active_counts():
                await self._put_record(client)

    # --- writes -------------------------------------------------------------------------

    async def publish(self) -> None:
        """Write the change the operator just made locally to etcd, then return once this
        node applied it. OperationError, with the local change undone, when etcd did not
        take it (unreachable, or another writer changed the same keys first)."""
        local = self.balancer.runtime_state
        puts, deletes = fleet_keys.difference(self.applied, local)
        # An entry this node's config cannot hold (restore_state drops those at a reload)
        # is another node's business: never deleted from here.
        deletes = [k for k in deletes if self._fits(k)]
        if not puts and not deletes:
            return
        client = self.client
        if client is None or not self.connected:
            self._undo(local)
            raise OperationError(f"not changed: the fleet's store is unreachable "
                                 f"({self.error}); every node keeps its last state")
        tx = client.transactions
        keys = [self.state_root + k for k in [*puts, *deletes]]
        compare = [tx.mod(k.encode()) < self.revision + 1 for k in keys]
        ops = ([tx.put((self.state_root + k).encode(), v) for k, v in puts.items()]
               + [tx.delete((self.state_root + k).encode()) for k in deletes])
        try:
            ok, responses = await client.transaction(compare=compare, success=ops, failure=[])
        except Exception as exc:
            self._undo(local)
            raise OperationError(f"not changed: etcd {self.endpoint}: {_cause(exc)}; "
                                 "every node keeps its last state") from None
        if not ok:
            self._undo(local)
            names = ", ".join(k[len(self.state_root):] for k in keys)
            raise OperationError(f"not changed: another node changed {names} after revision "
                                 f"{self.revision}; look again and retry")
        revision = _txn_revision(responses)
        if not await self._until_applied(revision):
            raise OperationError(f"written to etcd at revision {revision}, but this node "
                                 f"has not applied it after {APPLY_TIMEOUT:g} s "
                                 f"({self.error or 'watch slow'})")

    def _fits(self, key: str) -> bool:
        """Whether this node's config can hold the entry a state key names, as
        restore_state judges it: an entry it cannot hold is dropped from the local state
        at a reload, and that must not delete it for the fleet."""
        section, _, name = key.partition("/")
        applied = self.applied
        if section == "listeners":
            listener, sni = split_route_key(name)
            found = self.balancer.listeners.get(listener)
            route = applied.listeners.get(name, {})
            return (found is not None and (sni is None or sni in found.sni_routes)
                    and all(p in self.balancer.pools
                            for p in route.get("split") or [route.get("pool")]))
        pool_name, _, backend = name.partition("/")
        pool = self.balancer.pools.get(pool_name)
        if pool is None:
            return False
        if section == "backends":          # a config backend's override: kept while it is
            return (backend in pool.backends or name in self.balancer.runtime_state.removed)
        return True

    def _undo(self, local: RuntimeState) -> None:
        apply_difference(self.operator, local, self.applied)
        self.balancer.workers.converge(local, self.applied)
        restored = copy.deepcopy(self.applied)
        restored.revision = self.revision
        self.balancer.runtime_state = restored

    # --- the fleet's view ---------------------------------------------------------------

    def live_nodes(self) -> dict[str, dict]:
        """Every live node's record; this node's own from its live figures."""
        nodes = dict(self.nodes)
        nodes[self.node] = self._record()
        return nodes

    async def until_fleet_applied(self, timeout: float | None) -> None:
        """Return once every live node applied this node's last state change;
        OperationError naming the laggards after `timeout` s."""
        target = self.state_revision

        def lagging():
            return sorted(n for n, r in self.live_nodes().items()
                          if r.get("applied", 0) < target)
        if not await self._poll(lambda: not lagging(), timeout):
            raise OperationError(f"applied here, but not yet on {', '.join(lagging())} "
                                 f"after {timeout:g} s (revision {target})")

    def fleet_active(self, ref: str) -> int:
        return sum(r.get("active", {}).get(ref, 0) for r in self.live_nodes().values())

    async def until_fleet_idle(self, ref: str, timeout: float | None) -> bool:
        return await self._poll(lambda: self.fleet_active(ref) == 0, timeout)

    async def _poll(self, done, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(FLEET_POLL)
        return True

    def rows(self) -> list[dict]:
        """`show cluster`: one row per live node."""
        now = time.time()
        rows = []
        for name, record in sorted(self.live_nodes().items()):
            active = record.get("active", {})
            applied = record.get("applied", 0)
            rows.append({
                "node": name,
                "self": name == self.node,
                "pid": record.get("pid"),
                "applied": applied,
                "lag": max(0, self.state_revision - applied),
                "heartbeat_age_s": round(max(0.0, now - record.get("heartbeat", now)), 3),
                "active": sum(active.values()),
                "backends": dict(active),
                # this node's own etcd session: "connected", or why not; None for others
                "etcd": (("connected" if self.connected else self.error)
                         if name == self.node else None),
            })
        return rows


async def _bounded(awaitable, timeout: float) -> None:
    """Wait for `awaitable` up to `timeout` s, whatever it raises, and never longer: aetcd's
    close swallows a cancellation while it waits on a dead stream, so asyncio.wait_for
    (which waits for the cancelled task to end) could hang a shutdown forever."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
    elif not task.cancelled():
        task.exception()                            # retrieved: never "never retrieved"


def _record(raw: bytes) -> dict:
    """A node record from its JSON; an unreadable one counts as a node that applied
    nothing (it holds `--fleet` back rather than being skipped)."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    active = record.get("active")
    if not isinstance(active, dict):
        record["active"] = {}
    if not isinstance(record.get("applied"), int):
        record["applied"] = 0
    return record


def _txn_revision(responses) -> int:
    """The revision of a transaction, from the header of its first op's response."""
    for response in responses:
        for field in ("response_put", "response_delete_range"):
            if response.HasField(field):
                return getattr(response, field).header.revision
    return 0


def _cause(exc: Exception) -> str:
    """A short cause for a reply or a log line: the gRPC message, without its details."""
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
