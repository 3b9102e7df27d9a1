# TEMPORARY placeholder until the config branch merges (same public API, no validation).
import socket, tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

class ConfigIssue(NamedTuple):
    file: str; line: int; key: str; message: str
    def __str__(self): return f"{self.file}:{self.line} {self.key}: {self.message}"

class ConfigError(Exception):
    def __init__(self, issues):
        self.issues = issues; super().__init__("\n".join(map(str, issues)))

@dataclass(frozen=True)
class Address:
    host: str; port: int
    @property
    def family(self): return socket.AF_INET6 if ":" in self.host else socket.AF_INET
    def __str__(self): return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

def parse_address(s):
    host, _, port = s.rpartition(":")
    return Address(host.strip("[]"), int(port))

@dataclass
class GlobalConfig: max_connections: int = 20000; shutdown_timeout: float = 30.0
@dataclass
class ControlConfig: socket: Path = Path("l4lb.sock"); mode: int = 0o600
@dataclass
class LogConfig: level: str = "info"; format: str = "json"; access: bool = True
@dataclass
class MetricsConfig: listen: Address | None = None
@dataclass
class BackendConfig: name: str; address: Address; weight: int = 1; max_connections: int = 0
@dataclass
class HealthConfig:
    interval: float = 2.0; timeout: float = 1.0; rise: int = 2; fall: int = 3; send: str = ""; expect: str = ""; send_proxy: str = "off"
@dataclass
class PoolConfig:
    name: str; algorithm: str = "wrr"; hash_key: str = "src_ip"; slow_start: float = 0.0; on_down: str = "keep"
    backends: list = field(default_factory=list); health: HealthConfig | None = None
@dataclass
class ListenerConfig:
    name: str; bind: list; pool: str | None = None; split: dict | None = None; sticky_split: bool = True
    connect_timeout: float = 2.0; idle_timeout: float = 600.0; retries: int = 2; send_proxy: str = "off"
    accept_proxy: bool = False; proxy_timeout: float = 5.0; allow: list = field(default_factory=list)
    deny: list = field(default_factory=list); max_connections: int = 10000; per_source_max_connections: int = 0
    per_source_rate: float = 0.0; queue_timeout: float = 5.0
@dataclass
class Config:
    path: Path; global_: GlobalConfig; control: ControlConfig; log: LogConfig; metrics: MetricsConfig
    listeners: dict; pools: dict

def default_config_path(): return Path(__file__).with_name("default.toml")

def load_config(path):
    path = Path(path)
    return parse_config(path.read_text(), path)

def parse_config(text, path):
    path = Path(path); d = tomllib.loads(text)
    pools = {}
    for name, p in d.get("pools", {}).items():
        p = dict(p); h = p.pop("health", None)
        bs = [BackendConfig(**{**b, "address": parse_address(b["address"])}) for b in p.pop("backends", [])]
        pools[name] = PoolConfig(name=name, backends=bs, health=HealthConfig(**h) if h is not None else None, **p)
    listeners = {n: ListenerConfig(name=n, **{**l, "bind": [parse_address(b) for b in l["bind"]]}) for n, l in d.get("listeners", {}).items()}
    c = d.get("control", {})
    sock = Path(c.get("socket", "l4lb.sock"))
    if not sock.is_absolute(): sock = path.parent / sock
    m = d.get("metrics", {})
    return Config(path, GlobalConfig(**d.get("global", {})), ControlConfig(sock, c.get("mode", 0o600)), LogConfig(**d.get("log", {})),
                  MetricsConfig(parse_address(m["listen"]) if "listen" in m else None), listeners, pools)
