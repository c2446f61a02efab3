"""The dashboard in a real headless browser: Debian's chromium driven by Playwright (never a
downloaded browser), against the real service on loopback over a real store holding one
halting rollout, one stale device and one that never reported."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepack import fleetreport
from edgepack.fleet import ingest
from edgepack.fleet.app import make_app
from edgepack.fleet.sql import open_store
from edgepack.fleet.store import Decision, FleetStore
from tests.fleet._devices import FakeDevice, model_entry
from tests.fleet.test_service import TOKEN, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HALT_REASON = "failure rate 100% (2 of 2 fresh devices) crossed --halt-on-failure 5%"
HOSTILE = '<img src=x onerror="document.title=1">'
_FIGURES = {"rows": 500, "max_feature_psi": 0.5, "anomaly_rate": 0.01}
MONITORING = {
    **_FIGURES,
    "revision": "r1",
    "mean_confidence": 0.8,
    "previous": {**_FIGURES, "revision": "r0", "drift_psi": 0.02, "mean_confidence": 0.9,
                 "alerts": []},
}  # fmt: skip

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")


def enrol(store: FleetStore, device: FakeDevice) -> None:
    record = fleetreport.parse_record(device.record_bytes())
    store.register(ingest.device_from_record(record, now=time.time()))


def send(store: FleetStore, device: FakeDevice, entry: dict[str, Any], *, at: float) -> None:
    body = device.report({"detector": entry})
    ingest.ingest(store, body, device.sign(body), now=at)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fleet: two devices healthy on 1.0.0, two that failed 2.0.0's health check (so the
    rollout of 2.0.0 was halted), one whose last report is two hours old, one never seen."""
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    now = time.time()
    devices = {name: FakeDevice() for name in ("ok1", "ok2", "bad1", "bad2", "stale", "unseen")}
    for device in devices.values():
        enrol(store, device)
    for name in ("ok1", "ok2"):
        entry = model_entry(version="1.0.0")
        # Both monitor 1.0.0 against 0.9.0 before it; ok1's inputs drift.
        entry["monitoring"] = {
            **MONITORING,
            "alerts": ["drift"] if name == "ok1" else [],
            "drift_psi": 0.4 if name == "ok1" else 0.02,
        }
        send(store, devices[name], entry, at=now)
    for name in ("bad1", "bad2"):
        send(
            store,
            devices[name],
            model_entry(
                version="1.0.0",
                refused={"2.0.0": "health check failed: 812 ms over the 200 ms budget"},
                last_action="failed",
                last_error=HOSTILE,
            ),
            at=now,
        )
    send(store, devices["stale"], model_entry(version="1.0.0"), at=now - 7200)
    store.claim(Decision("detector", "stable", "2.0.0", "halt", 10.0, HALT_REASON, now - 60))
    try:
        with running(make_app(store, operator_tokens=[TOKEN])) as url:
            yield {"url": url, "devices": devices}
    finally:
        store.close()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and a check that it is a PNG)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_the_dashboard_shows_the_halted_rollout_and_the_stale_device(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    url = fleet["url"]
    devices = fleet["devices"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))

            # Without the token: the denial page, no fleet data.
            denied = page.goto(url + "/")
            assert denied is not None and denied.status == 401
            assert "operator token" in page.locator("#denied").inner_text()
            assert devices["ok1"].device_id not in page.content()

            # Once with ?token=: a cookie, and the token leaves the address bar.
            page.goto(url + "/?token=" + TOKEN.decode())
            assert page.url == url + "/"
            cookie = next(c for c in page.context.cookies() if c["name"] == "edgepack_fleet")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            rollouts = page.locator("#rollouts")
            halted = rollouts.locator('tr[data-release="detector/stable/2.0.0"]')
            assert "halt at 10%" in halted.inner_text()
            assert "health check failed: 2" in halted.locator(".failed").inner_text()
            assert halted.locator(".rate").inner_text().strip() == "100.0%"
            assert halted.locator(".running").inner_text() == "0"
            healthy = rollouts.locator('tr[data-release="detector/stable/1.0.0"]')
            assert healthy.locator(".running").inner_text() == "4"
            assert healthy.locator(".stale").inner_text() == "1"
            assert healthy.locator(".rate").inner_text().strip() == "0.0%"

            decisions = page.locator("#decisions tr.decision")
            assert decisions.count() == 1
            assert "halt" in decisions.inner_text() and HALT_REASON in decisions.inner_text()

            stale = page.locator("#stale-devices tr.device")
            assert stale.count() == 1
            assert devices["stale"].device_id in stale.inner_text()
            assert "2h ago" in stale.inner_text()
            unseen = page.locator("#unseen-devices tr.device")
            assert unseen.count() == 1 and devices["unseen"].device_id in unseen.inner_text()
            assert page.locator("#tile-halted b").inner_text() == "1"

            # The drift section: the release's monitoring, its canary, the drifting device.
            drift = page.locator("#drifting")
            monitored = drift.locator('tr.monitored[data-release="detector/stable/1.0.0"]')
            assert monitored.locator(".reporting").inner_text() == "2"
            assert monitored.locator(".alerting").inner_text() == "1"
            assert "-0.100" in monitored.locator(".canary").inner_text()
            assert "n=2" in monitored.locator(".canary").inner_text()
            drifting = drift.locator("tr.drifting")
            assert drifting.count() == 1
            assert devices["ok1"].device_id in drifting.inner_text()
            assert "drift" in drifting.locator(".alerts").inner_text()
            assert page.locator("#tile-drifting b").inner_text() == "1"

            # A device's error text is shown as text, never as markup.
            assert HOSTILE in page.locator("#devices").inner_text()
            assert page.locator("img").count() == 0
            assert page.title() == "edgepack fleet"

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    # Nothing loaded from anywhere but the service.
    assert requests and all(r.startswith(url + "/") for r in requests), requests
    data = shot.read_bytes()
    width, height = png_size(data)
    assert width == 1280 and height >= 900
    assert len(data) > 20_000  # a rendered page, not a blank one
