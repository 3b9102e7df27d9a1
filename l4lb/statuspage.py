"""The status page: GET / on the metrics listener, one self-contained HTML page.

The server renders the first view from a live snapshot (l4lb.live), so the page reads
without JavaScript (and then reloads itself every NOSCRIPT_REFRESH seconds); its script
then fetches GET /status.json, the same snapshot, every POLL_MS milliseconds and redraws
the tables, keeping a short history per backend for the sparklines. Nothing is loaded
from elsewhere: style and script are inline, sparklines are inline SVG.

Both renderings read the one column table, l4lb.live.BACKEND_COLUMNS (the script gets it
as JSON), so the server's first view and the script's updates show the same cells. Every
text from the snapshot is HTML-escaped: backend names and errors are operator input.
"""
from __future__ import annotations

import json
import time
from html import escape

from . import __version__
from .live import BACKEND_COLUMNS, format_count, format_eta

# Milliseconds between two fetches of /status.json by the page's script.
POLL_MS = 1000
# Seconds after which a browser without JavaScript reloads the page.
NOSCRIPT_REFRESH = 5
# Points of history per sparkline (at POLL_MS, the last minute).
HISTORY = 60

STYLE = """
body{font:14px/1.35 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 .6em 0 0;display:inline}h2{font-size:1.05em;margin:1.2em 0 .3em}
header{border-bottom:1px solid #ccc;padding-bottom:.4em}#updated{color:#777;float:right}
table{border-collapse:collapse;background:#fff}th,td{padding:2px 8px;border-bottom:1px solid #eee}
th{text-align:left;background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.pool th{background:#e4ecf7}tr.b-draining td{background:#fff6df}tr.b-maint td{color:#888}
tr.b-down td{background:#fde8e8}.health-failing{color:#b00;font-weight:600}
.admin-draining{color:#a60;font-weight:600}.admin-maint{color:#666}.none{color:#777}
svg.spark{vertical-align:middle}
"""

SCRIPT = r"""
const COLUMNS = __COLUMNS__, HISTORY = __HISTORY__, POLL_MS = __POLL_MS__;
const hist = {};
function esc(s){return String(s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
function field(row,path){let v=row;for(const p of path.split('.')){if(v===null||typeof v!=='object')return null;v=v[p];if(v===undefined)return null;}return v;}
function fcount(v){if(v===null)return '-';for(const [l,u,s] of [[1e9,1e9,'G'],[1e6,1e6,'M'],[1e4,1e3,'k']])if(Math.abs(v)>=l)return (v/u).toFixed(1)+s;return Number.isInteger(v)?String(v):v.toFixed(Math.abs(v)<0.1?2:1);}
function fbytes(v){if(v===null)return '-';for(const [l,s] of [[2**30,'G'],[2**20,'M'],[2**10,'K']])if(v>=l)return (v/l).toFixed(1)+s;return Math.floor(v)+'B';}
const FORMATS={text:v=>v===null?'-':String(v),count:fcount,bytes:fbytes};
function feta(d){if(d.drained)return 'done';const e=d.eta_s;if(e===null)return '?';if(e<60)return Math.round(e)+'s';if(e<3600)return Math.floor(e/60)+'m'+String(Math.floor(e%60)).padStart(2,'0')+'s';return (e/3600).toFixed(1)+'h';}
function spark(points){if(points.length<2)return '';const max=Math.max(...points,1e-9),w=80,h=16;
 const xy=points.map((p,i)=>(i*w/(points.length-1)).toFixed(1)+','+(h-1-(p/max)*(h-2)).toFixed(1)).join(' ');
 return '<svg class="spark" width="'+w+'" height="'+h+'"><polyline fill="none" stroke="#36c" stroke-width="1.2" points="'+xy+'"/></svg>';}
function backendRow(b){const key=b.pool+'/'+b.name,h=(hist[key]=hist[key]||[]);
 if(b.rates){h.push(b.rates.new_s);if(h.length>HISTORY)h.shift();}
 let cells=COLUMNS.map(c=>{const v=field(b,c.path),cls='c-'+c.key+(c.kind==='text'?'':' num')+(c.key==='health'?' health-'+esc(b.health):'')+(c.key==='admin'?' admin-'+esc(b.admin):'');
  return '<td class="'+cls+'">'+esc(FORMATS[c.kind](v))+'</td>';}).join('');
 return '<tr class="backend b-'+esc(b.state)+'" id="backend:'+esc(key)+'" data-pool="'+esc(b.pool)+'" data-backend="'+esc(b.name)+'">'+cells+'<td class="c-trend">'+spark(h)+'</td></tr>';}
function render(s){
 const i=s.info;document.getElementById('info').textContent='l4lb '+i.version+' · pid '+i.pid+' · up '+Math.round(i.uptime_s)+'s · active '+i.conns_active+' · total '+i.conns_total+' · cpu '+(i.cpu_percent===null?'-':i.cpu_percent+'%');
 document.getElementById('updated').textContent='updated '+new Date(s.ts*1000).toLocaleTimeString();
 document.getElementById('workers-body').innerHTML=s.workers.map(w=>'<tr id="worker:'+w.worker+'"><td>'+w.worker+'</td><td class="num">'+w.pid+'</td><td class="num c-active">'+w.active+'</td><td class="num">'+w.accepted+'</td><td class="num">'+fcount(w.rates?w.rates.accepted_s:null)+'</td><td class="num">'+w.restarts+'</td></tr>').join('');
 document.getElementById('drains-body').innerHTML=s.drains.length?s.drains.map(d=>'<tr class="drain" id="drain:'+esc(d.pool+'/'+d.backend)+'"><td>'+esc(d.pool+'/'+d.backend)+'</td><td class="num c-remaining">'+d.remaining+'</td><td class="num">'+fcount(d.closes_s)+'</td><td class="num c-eta">'+esc(feta(d))+'</td><td>'+esc(d.set_by||'operator')+'</td></tr>').join(''):'<tr><td colspan="5" class="none">no backend is draining</td></tr>';
 const pools={};for(const p of s.pools)pools[p.name]=p;
 let rows='';for(const p of s.pools){rows+='<tr class="pool" id="pool:'+esc(p.name)+'"><th colspan="'+(COLUMNS.length+1)+'">pool '+esc(p.name)+' · '+esc(p.algorithm)+' · queue <span class="c-queue">'+p.queue+'</span> · '+p.backends+' backends</th></tr>';
  for(const b of s.backends)if(b.pool===p.name)rows+=backendRow(b);}
 document.getElementById('backends-body').innerHTML=rows;
 document.getElementById('listeners-body').innerHTML=s.listeners.map(l=>'<tr id="listener:'+esc(l.name)+'"><td>'+esc(l.name)+'</td><td>'+esc(l.bind.join(' '))+'</td><td>'+esc(l.pool!==null?l.pool:Object.entries(l.split||{}).map(e=>e[0]+'='+e[1]).join(' '))+'</td><td class="num">'+l.active+'</td><td class="num">'+l.accepted+'</td><td class="num">'+fcount(l.rates?l.rates.accepted_s:null)+'</td></tr>').join('');
}
async function poll(){try{const r=await fetch('/status.json',{cache:'no-store'});if(r.ok)render(await r.json());else document.getElementById('updated').textContent='status.json: HTTP '+r.status;}
 catch(e){document.getElementById('updated').textContent='cannot reach the balancer: '+e;}
 setTimeout(poll,POLL_MS);}
poll();
"""


def _td(text: str, cls: str = "", num: bool = False) -> str:
    classes = " ".join(c for c in (cls, "num" if num else "") if c)
    return f'<td class="{classes}">{escape(text)}</td>' if classes else f"<td>{escape(text)}</td>"


def _backend_row(b: dict) -> str:
    cells = []
    for c in BACKEND_COLUMNS:
        cls = f"c-{c.key}"
        if c.key == "health":
            cls += f" health-{b['health']}"
        elif c.key == "admin":
            cls += f" admin-{b['admin']}"
        cells.append(_td(c.text(b), cls, num=c.kind != "text"))
    key = f"{b['pool']}/{b['name']}"
    return (f'<tr class="backend b-{escape(b["state"])}" id="backend:{escape(key)}" '
            f'data-pool="{escape(b["pool"])}" data-backend="{escape(b["name"])}">'
            + "".join(cells) + '<td class="c-trend"></td></tr>')


def _backends(snap: dict) -> str:
    rows = []
    for p in snap["pools"]:
        rows.append(f'<tr class="pool" id="pool:{escape(p["name"])}"><th colspan="'
                    f'{len(BACKEND_COLUMNS) + 1}">pool {escape(p["name"])} · '
                    f'{escape(p["algorithm"])} · queue <span class="c-queue">{p["queue"]}'
                    f'</span> · {p["backends"]} backends</th></tr>')
        rows.extend(_backend_row(b) for b in snap["backends"] if b["pool"] == p["name"])
    return "".join(rows)


def _drains(snap: dict) -> str:
    if not snap["drains"]:
        return '<tr><td colspan="5" class="none">no backend is draining</td></tr>'
    return "".join(
        f'<tr class="drain" id="drain:{escape(d["pool"])}/{escape(d["backend"])}">'
        + _td(f"{d['pool']}/{d['backend']}") + _td(str(d["remaining"]), "c-remaining", True)
        + _td(format_count(d["closes_s"]), num=True) + _td(format_eta(d), "c-eta", True)
        + _td(d["set_by"] or "operator") + "</tr>"
        for d in snap["drains"])


def _workers(snap: dict) -> str:
    return "".join(
        f'<tr id="worker:{w["worker"]}">' + _td(str(w["worker"])) + _td(str(w["pid"]), num=True)
        + _td(str(w["active"]), "c-active", True) + _td(str(w["accepted"]), num=True)
        + _td(format_count((w["rates"] or {}).get("accepted_s")), num=True)
        + _td(str(w["restarts"]), num=True) + "</tr>"
        for w in snap["workers"])


def _route(listener: dict) -> str:
    if listener["pool"] is not None:
        return listener["pool"]
    return " ".join(f"{p}={pct}" for p, pct in (listener["split"] or {}).items())


def _listeners(snap: dict) -> str:
    return "".join(
        f'<tr id="listener:{escape(lst["name"])}">' + _td(lst["name"]) + _td(" ".join(lst["bind"]))
        + _td(_route(lst)) + _td(str(lst["active"]), num=True)
        + _td(str(lst["accepted"]), num=True)
        + _td(format_count((lst["rates"] or {}).get("accepted_s")), num=True) + "</tr>"
        for lst in snap["listeners"])


def _info(snap: dict) -> str:
    i = snap["info"]
    cpu = "-" if i["cpu_percent"] is None else f"{i['cpu_percent']}%"
    return (f"l4lb {i['version']} · pid {i['pid']} · up {round(i['uptime_s'])}s · active "
            f"{i['conns_active']} · total {i['conns_total']} · cpu {cpu}")


def _head(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{escape(n)}</th>" for n in names) + "</tr>"


def render_page(snap: dict) -> bytes:
    """The whole page for snapshot `snap` (l4lb.live.live_snapshot), UTF-8."""
    script = (SCRIPT.replace("__COLUMNS__", json.dumps([c.as_json() for c in BACKEND_COLUMNS]))
              .replace("__HISTORY__", str(HISTORY)).replace("__POLL_MS__", str(POLL_MS)))
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["ts"]))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>l4lb status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH}"></noscript>
<style>{STYLE}</style></head>
<body data-version="{escape(__version__)}">
<header><h1>l4lb</h1><span id="info">{escape(_info(snap))}</span>
<span id="updated">as of {stamp}</span></header>
<h2>Workers</h2>
<table id="workers"><thead>{_head("worker", "pid", "active", "accepted", "accept/s", "restarts")}</thead>
<tbody id="workers-body">{_workers(snap)}</tbody></table>
<h2>Drains</h2>
<table id="drains"><thead>{_head("backend", "remaining", "closes/s", "ETA", "by")}</thead>
<tbody id="drains-body">{_drains(snap)}</tbody></table>
<h2>Pools and backends</h2>
<table id="backends"><thead>{_head(*(c.heading for c in BACKEND_COLUMNS), "new/s trend")}</thead>
<tbody id="backends-body">{_backends(snap)}</tbody></table>
<h2>Listeners</h2>
<table id="listeners"><thead>{_head("listener", "bind", "route", "active", "accepted", "accept/s")}</thead>
<tbody id="listeners-body">{_listeners(snap)}</tbody></table>
<script>{script}</script>
</body></html>
"""
    return page.encode("utf-8")
