"""The fleet service's read-only dashboard: one server-rendered HTML page.

``GET /`` renders :func:`edgepack.fleet.summary.fleet_status` as HTML: the
rollouts (per model, channel and release: running, installing, failed by reason,
failure rate, stale, and the last decision taken on it), the decisions log of
``fleet watch`` (halt, rollback, widen, with their reasons), and the stale and
unseen devices. Every value is HTML-escaped; the page loads no script, font,
style sheet or image from anywhere (the app's Content-Security-Policy forbids it)
and refreshes itself every 30 seconds with a ``<meta>`` tag. Stable element ids
(``rollouts``, ``decisions``, ``drifting`` — per release its monitoring and canary
comparison, then the devices raising monitoring alerts — ``stale-devices``, ``unseen-devices``, ``devices``)
let tests and scrapers find the parts. Long lists are cut at :data:`MAX_ROWS`.
The status endpoint's query parameters narrow the page too:
``/?model=M&channel=C&stale_after=2h&unseen_since=1d``.

**Access.** The dashboard shows the fleet, so it needs the operator token like
the API. A browser cannot send a Bearer header by itself, so either

* put it behind a reverse proxy that adds ``Authorization: Bearer TOKEN`` to
  requests it has authenticated itself (e.g. nginx with ``auth_request`` or your
  SSO, then ``proxy_set_header Authorization "Bearer …"``), or
* open ``/?token=TOKEN`` once: the service answers with a redirect to ``/`` and an
  ``HttpOnly; SameSite=Strict`` cookie (``Secure`` over HTTPS) valid for 12 hours,
  derived from the token (an HMAC, not the token itself, and good for the
  dashboard only, never the API), so the token leaves the address bar and the
  browser's history at once.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from typing import Any

MAX_ROWS = 200
"""At most this many rows per device list (the page stays small at 100k devices)."""
REFRESH_S = 30

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .5em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f3f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#57606a}.tiles{display:flex;gap:1em;margin:1em 0}
.tile{background:#fff;border:1px solid #d0d7de;padding:.5em 1em;min-width:7em}
.tile b{display:block;font-size:1.6em}
.bad{color:#b42318;font-weight:600}.ok{color:#1a7f37}.warn{color:#9a6700}
.badge{display:inline-block;padding:0 .5em;border-radius:1em;font-size:.85em;color:#fff}
.halt{background:#b42318}.rollback{background:#8250df}.widen{background:#1a7f37}
.bar{display:inline-block;height:.7em;background:#b42318;vertical-align:middle}
.barbox{display:inline-block;width:6em;height:.7em;background:#e6e9ed;margin-right:.4em}
code{font-size:.9em}ul.reasons{margin:0;padding-left:1.1em}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(at: float | None, now: float) -> str:
    """``2026-12-03 19:04Z (5m ago)`` for a time stamp, ``never`` for None."""
    if at is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
    return f"{stamp} ({age(now - at)} ago)"


def age(seconds: float) -> str:
    """A short human duration: ``42s``, ``5m``, ``3h``, ``2d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _rate(rate: float | None) -> str:
    if rate is None:
        return '<span class="meta">—</span>'
    width = round(rate * 6, 2)
    cls = "bad" if rate > 0 else "ok"
    return (
        f'<span class="barbox"><span class="bar" style="width:{width}em"></span></span>'
        f'<span class="{cls}">{rate * 100:.1f}%</span>'
    )


def _table(head: Iterable[str], rows: list[str], empty: str, cols: int) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(rows) or f'<tr><td colspan="{cols}" class="meta">{_e(empty)}</td></tr>'
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _last_decisions(
    decisions: list[Mapping[str, Any]],
) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    last: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for d in sorted(decisions, key=lambda d: d["decided_at"]):
        last[(d["model"], d["channel"], d["version"])] = d
    return last


def _rollouts(status: Mapping[str, Any]) -> str:
    last = _last_decisions(status["decisions"])
    rows = []
    for r in status["releases"]:
        key = (r["model"], r["channel"], r["version"])
        failed = r["failed"]
        reasons = (
            '<ul class="reasons">'
            + "".join(f"<li>{_e(why)}: <b>{_e(n)}</b></li>" for why, n in failed.items())
            + "</ul>"
            if failed
            else "0"
        )
        decision = last.get(key)
        badge = (
            f'<span class="badge {_e(decision["action"])}" title="{_e(decision["reason"])}">'
            f"{_e(decision['action'])} at {_e(_step(decision['step']))}</span>"
            if decision
            else ""
        )
        rows.append(
            f'<tr class="release" data-release="{_e("/".join(key))}">'
            f"<td>{_e(r['model'])}</td><td>{_e(r['channel'])}</td>"
            f"<td><code>{_e(r['version'])}</code> {badge}</td>"
            f'<td class="n running">{_e(r["running"])}</td>'
            f'<td class="n installing">{_e(r["installing"])}</td>'
            f'<td class="failed">{reasons}</td>'
            f'<td class="rate">{_rate(r["failure_rate"])}</td>'
            f'<td class="n stale">{_e(r["stale"])}</td></tr>'
        )
    return _table(
        ("model", "channel", "release", "running", "installing", "failed", "failure rate", "stale"),
        rows,
        "no device has reported a release yet",
        8,
    )


def _step(step: object) -> str:
    return f"{step:g}%" if isinstance(step, int | float) else str(step)


def _decisions(status: Mapping[str, Any], now: float) -> str:
    rows = [
        f'<tr class="decision" data-action="{_e(d["action"])}">'
        f"<td>{_e(_when(d['decided_at'], now))}</td>"
        f'<td><span class="badge {_e(d["action"])}">{_e(d["action"])}</span></td>'
        f"<td>{_e(d['model'])}</td><td>{_e(d['channel'])}</td>"
        f'<td><code>{_e(d["version"])}</code></td><td class="n">{_e(_step(d["step"]))}</td>'
        f'<td class="reason">{_e(d["reason"])}</td></tr>'
        for d in sorted(status["decisions"], key=lambda d: d["decided_at"], reverse=True)
    ]
    return _table(
        ("when", "action", "model", "channel", "release", "rollout", "reason"),
        rows,
        "no rollout decision yet",
        7,
    )


def _models(models: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, m in models.items():
        text = f"{name} {m.get('version') or '—'} ({m.get('channel')})"
        if m.get("pending"):
            text += f" → {m['pending']}"
        if m.get("last_action") == "failed" and m.get("last_error"):
            text += f": {m['last_error']}"
        parts.append(_e(text))
    return "<br>".join(parts) or '<span class="meta">no report</span>'


def _num(value: object, digits: int = 3) -> str:
    return "—" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _drift(status: Mapping[str, Any]) -> str:
    """Per release, its monitoring and canary comparison; then the drifting devices."""
    rows = []
    for r in status["releases"]:
        mon = r.get("monitoring")
        if not mon:
            continue
        canary = mon["canary"]
        compared = (
            '<span class="meta">—</span>'
            if canary is None
            else f'<span class="{"bad" if canary["change"] < 0 else "ok"}">'
            f"{_e(format(canary['change'], '+.3f'))}</span> ({_e(_num(canary['confidence']))} vs "
            f"{_e(_num(canary['previous_confidence']))}, n={_e(canary['devices'])})"
        )
        key = "/".join((r["model"], r["channel"], r["version"]))
        rows.append(
            f'<tr class="monitored" data-release="{_e(key)}">'
            f"<td>{_e(r['model'])}</td><td>{_e(r['channel'])}</td>"
            f"<td><code>{_e(r['version'])}</code></td>"
            f'<td class="n reporting">{_e(mon["reporting"])}</td>'
            f'<td class="n alerting">{_e(mon["alerting"])}</td>'
            f'<td class="n psi">{_e(_num(mon["median_drift_psi"]))}</td>'
            f'<td class="n confidence">{_e(_num(mon["mean_confidence"]))}</td>'
            f'<td class="canary">{compared}</td></tr>'
        )
    releases = _table(
        ("model", "channel", "release", "reporting", "alerting", "median PSI", "confidence",
         "canary: vs previous, same devices"),
        rows,
        "no fresh device reports monitoring",
        8,
    )  # fmt: skip
    drifting = status.get("drifting") or []
    devices = [
        f'<tr class="drifting" data-device="{_e(d["device_id"])}">'
        f"<td><code>{_e(d['device_id'])}</code></td><td>{_e(d['model'])}</td>"
        f"<td><code>{_e(d['version'])}</code> ({_e(d['revision'])})</td>"
        f'<td class="alerts bad">{_e(", ".join(d["alerts"]))}</td>'
        f'<td class="n">{_e(_num(d["drift_psi"]))}</td>'
        f'<td class="n">{_e(_num(d["anomaly_rate"]))}</td>'
        f'<td class="n">{_e(_num(d["mean_confidence"]))}</td></tr>'
        for d in drifting[:MAX_ROWS]
    ]
    table = _table(
        ("device", "model", "release", "alerts", "drift PSI", "anomaly rate", "confidence"),
        devices,
        "no fresh device raises a monitoring alert",
        7,
    )
    return f"{releases}<h3>Drifting devices</h3>{table}{_more(len(drifting))}"


_REVOKED = ' <span class="bad">revoked</span>'


def _device_rows(devices: list[Mapping[str, Any]], now: float) -> list[str]:
    return [
        f'<tr class="device" data-device="{_e(d["device_id"])}">'
        f"<td><code>{_e(d['device_id'])}</code>{_REVOKED if d.get('revoked') else ''}</td>"
        f"<td>{_e(_when(d['last_seen'], now))}</td><td>{_models(d['models'])}</td></tr>"
        for d in devices[:MAX_ROWS]
    ]


def _more(total: int) -> str:
    return f'<p class="meta">{total - MAX_ROWS} more not shown</p>' if total > MAX_ROWS else ""


def render(status: Mapping[str, Any], *, now: float) -> str:
    """The dashboard page for a :func:`~edgepack.fleet.summary.fleet_status` result."""
    devices: list[Mapping[str, Any]] = status["devices"]
    by_id = {d["device_id"]: d for d in devices}
    stale = [d for d in devices if d.get("stale") and not d.get("revoked")]
    unseen = [
        by_id.get(i, {"device_id": i, "last_seen": None, "models": {}}) for i in status["unseen"]
    ]
    failing = [r for r in status["releases"] if r["failed"]]
    halted = {
        (d["model"], d["channel"], d["version"])
        for d in status["decisions"]
        if d["action"] != "widen"
    }
    drifting = status.get("drifting") or []
    head = ("device", "last seen", "models")
    tiles = "".join(
        f'<div class="tile" id="tile-{key}"><b class="{cls}">{_e(value)}</b>{_e(label)}</div>'
        for key, value, label, cls in (
            ("devices", len(devices), "devices", ""),
            ("releases", len(status["releases"]), "releases", ""),
            ("failing", len(failing), "releases with failures", "bad" if failing else "ok"),
            ("halted", len(halted), "halted or rolled back", "bad" if halted else "ok"),
            ("stale", len(stale), "stale devices", "warn" if stale else "ok"),
            ("unseen", len(unseen), "unseen devices", "warn" if unseen else "ok"),
            ("drifting", len(drifting), "drifting devices", "warn" if drifting else "ok"),
        )
    )
    stale_s = float(status.get("stale_after_s", 0))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgepack fleet</title><style>{_STYLE}</style></head>
<body>
<h1>edgepack fleet</h1>
<p class="meta" id="generated">generated {_e(_when(status.get("generated_at", now), now))};
a device is stale after {_e(age(stale_s))} without a fresh report; read-only, refreshes every {REFRESH_S} s</p>
<div class="tiles" id="summary">{tiles}</div>
<section id="rollouts"><h2>Rollouts</h2>{_rollouts(status)}</section>
<section id="decisions"><h2>Decisions</h2>{_decisions(status, now)}</section>
<section id="drifting"><h2>Drift</h2>{_drift(status)}</section>
<section id="stale-devices"><h2>Stale devices</h2>
{_table(head, _device_rows(stale, now), "no stale device", 3)}{_more(len(stale))}</section>
<section id="unseen-devices"><h2>Unseen devices</h2>
{_table(head, _device_rows(unseen, now), "every registered device has reported", 3)}{_more(len(unseen))}</section>
<section id="devices"><h2>Devices</h2>
{_table(head, _device_rows(devices, now), "no device registered", 3)}{_more(len(devices))}</section>
</body></html>
"""


def render_denied(message: str) -> str:
    """The page a browser gets without a valid operator token."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgepack fleet: operator token needed</title>
<style>{_STYLE}</style></head><body>
<h1>edgepack fleet</h1>
<p class="bad" id="denied">{_e(message)}</p>
<p>The dashboard needs an operator token: send <code>Authorization: Bearer TOKEN</code>
(a reverse proxy can add it), or open <code>/?token=TOKEN</code> once to get a cookie.</p>
</body></html>
"""
