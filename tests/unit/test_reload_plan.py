"""reload.plan_reload: what a reload adds, rebuilds, updates and removes, and the change
lines it reports, from two configs and the running backends. No sockets, no loop."""
from l4lb.config import parse_config
from l4lb.reload import RunningBackend, plan_reload

BASE = """
[control]
socket = "l4lb.sock"
[listeners.web]
bind = ["127.0.0.1:8001"]
pool = "app"
{web_extra}
{more_listeners}
[pools.app]
algorithm = "{algorithm}"
backends = [
{backends}
]
{more_pools}
"""


def cfg(algorithm="rr", backends=(("a", 9001), ("b", 9002)), web_extra="",
        more_listeners="", more_pools=""):
    rows = ",\n".join(f'  {{ name = "{n}", address = "127.0.0.1:{p}"{extra} }}'
                      for n, p, *rest in backends for extra in [rest[0] if rest else ""])
    return parse_config(BASE.format(algorithm=algorithm, backends=rows, web_extra=web_extra,
                                    more_listeners=more_listeners, more_pools=more_pools),
                        "l4lb.toml")


def running(config):
    """What a balancer started on `config` runs: its backends as the file says."""
    return {name: {b.name: RunningBackend(b.address, b.weight, b.max_connections)
                   for b in pcfg.backends}
            for name, pcfg in config.pools.items()}


def test_same_config_plans_nothing():
    old = cfg()
    plan = plan_reload(old, running(old), set(), cfg())
    assert plan.changes == []
    assert [(p.cfg.name, p.action, p.remove, p.add, p.update) for p in plan.pools] == [
        ("app", "update", [], [], [])]
    assert [(l.cfg.name, l.added, l.open, l.close) for l in plan.listeners] == [
        ("web", False, [], [])]


def test_algorithm_change_rebuilds_the_pool_and_still_diffs_its_backends():
    old = cfg()
    new = cfg(algorithm="leastconn", backends=(("a", 9001), ("c", 9003)))
    plan = plan_reload(old, running(old), set(), new)
    (pool,) = plan.pools
    assert pool.action == "rebuild"
    assert pool.remove == ["b"] and [b.name for b in pool.add] == ["c"]
    assert plan.changes == ["pool app rebuilt", "backend app/b removed", "backend app/c added"]


def test_backend_added_at_runtime_is_kept_when_the_file_does_not_name_it():
    old = cfg()
    now = running(old)
    now["app"]["x"] = RunningBackend(old.pools["app"].backends[0].address, 1, 0)
    plan = plan_reload(old, now, {"app/x"}, cfg())
    assert plan.pools[0].remove == [] and plan.changes == []
    plan = plan_reload(old, now, set(), cfg())        # not the operator's: the file wins
    assert plan.pools[0].remove == ["x"]


def test_address_and_weight_changes_are_updates_with_one_line_each():
    old = cfg()
    new = cfg(backends=(("a", 9101), ("b", 9002, ", weight = 5")))
    plan = plan_reload(old, running(old), set(), new)
    assert [b.name for b in plan.pools[0].update] == ["a", "b"]
    assert plan.changes == ["backend app/a address 127.0.0.1:9101", "backend app/b weight 5"]


def test_weight_compared_with_the_running_weight_not_the_old_file():
    old = cfg()
    now = running(old)
    now["app"]["a"] = RunningBackend(now["app"]["a"].address, 7, 0)   # operator's `weight`
    plan = plan_reload(old, now, set(), cfg())
    assert [b.name for b in plan.pools[0].update] == ["a"]


def test_listeners_and_pools_added_and_removed_in_apply_order():
    extra_listener = '[listeners.admin]\nbind = ["127.0.0.1:8002"]\npool = "ops"\n'
    extra_pool = ('[pools.ops]\nalgorithm = "rr"\n'
                  'backends = [ { name = "o", address = "127.0.0.1:9901" } ]\n')
    small = cfg()
    big = cfg(more_listeners=extra_listener, more_pools=extra_pool)
    plan = plan_reload(small, running(small), set(), big)
    assert plan.changes == ["pool ops added", "listener admin added",
                            "listener admin: bind 127.0.0.1:8002 opened"]
    assert [(p.cfg.name, p.action) for p in plan.pools] == [("app", "update"), ("ops", "add")]
    plan = plan_reload(big, running(big), set(), small)
    assert plan.listeners_removed == ["admin"] and plan.pools_removed == ["ops"]
    assert plan.changes == ["listener admin removed", "pool ops removed"]


def test_moved_bind_closes_the_old_and_opens_the_new_one():
    old = cfg()
    new = parse_config(str(BASE.format(algorithm="rr", web_extra="", more_listeners="",
                                       more_pools="",
                                       backends='  { name = "a", address = "127.0.0.1:9001" },'
                                                '\n  { name = "b", address = "127.0.0.1:9002" }'
                                       )).replace("127.0.0.1:8001", "127.0.0.1:8009"),
                       "l4lb.toml")
    plan = plan_reload(old, running(old), set(), new)
    (lp,) = plan.listeners
    assert (lp.open, lp.close) == (["127.0.0.1:8009"], ["127.0.0.1:8001"])
    assert plan.changes == ["listener web: bind 127.0.0.1:8001 closed",
                            "listener web: bind 127.0.0.1:8009 opened"]


def test_buffer_size_back_to_zero_says_the_kept_binds_keep_theirs():
    old = cfg(web_extra="rcvbuf = 65536")
    plan = plan_reload(old, running(old), set(), cfg())
    assert plan.changes == ["listener web: rcvbuf 0 (autotuning) for backend sockets; client "
                            "sockets keep 65536 until the binds are reopened (restart)"]
    plan = plan_reload(cfg(), running(old), set(), cfg(web_extra="rcvbuf = 131072"))
    assert plan.changes == ["listener web: rcvbuf 131072"]


def test_a_weight_the_state_file_keeps_is_reported_as_not_applied():
    old = cfg()
    now = running(old)
    now["app"]["b"] = RunningBackend(now["app"]["b"].address, 5, 0)   # `weight app/b 5`
    new = cfg(backends=(("a", 9001), ("b", 9002, ", weight = 10")))
    plan = plan_reload(old, now, set(), new, {"app/b": {"weight": 5}})
    assert plan.changes == [
        "backend app/b weight 10 not applied: the state file keeps 5 (set with `weight`)"]


def test_a_max_connections_change_is_not_announced_as_a_weight():
    old = cfg()
    new = cfg(backends=(("a", 9001), ("b", 9002, ", max_connections = 7")))
    plan = plan_reload(old, running(old), set(), new)
    assert plan.changes == ["backend app/b max_connections 7"]


def test_log_and_global_max_connections_changes_are_listed():
    old = cfg()
    text = BASE.format(algorithm="rr", backends='  { name = "a", address = "127.0.0.1:9001" }',
                       web_extra="", more_listeners="", more_pools="")
    new = parse_config('[log]\nlevel = "debug"\naccess = false\n'
                       '[global]\nmax_connections = 500\n' + text, "l4lb.toml")
    plan = plan_reload(old, running(old), set(), new)
    assert plan.changes[:3] == ["log level debug", "log access false",
                                "global max_connections 500"]


def test_resolvers_changes_are_listed():
    old = cfg()
    text = BASE.format(algorithm="rr", backends='  { name = "a", address = "127.0.0.1:9001" }',
                       web_extra="", more_listeners="", more_pools="")
    new = parse_config(text + '\n[resolvers]\nnameservers = ["127.0.0.1:5353"]\nmax_ttl = 60.0\n',
                       "l4lb.toml")
    plan = plan_reload(old, running(old), set(), new)
    assert plan.changes[:2] == ["resolvers nameservers [127.0.0.1:5353]", "resolvers max_ttl 60"]


def test_a_backup_flag_change_is_an_update_with_its_line():
    old = cfg()
    new = cfg(backends=(("a", 9001), ("b", 9002, ", backup = true")))
    plan = plan_reload(old, running(old), set(), new)
    assert [b.name for b in plan.pools[0].update] == ["b"]
    assert plan.changes == ["backend app/b backup true"]
