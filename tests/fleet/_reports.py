"""Devices and reports for the store's tests: a fresh Ed25519 identity per device, report
bodies valid per :func:`edgepack.fleetreport.parse_report`, ingested as the service would."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from edgepack import fleetreport
from edgepack.fleet.store import Device, FleetStore


def entry(
    version: str | None = "1.0.0",
    *,
    channel: str = "stable",
    pending: str | None = None,
    last_action: str | None = "install",
    last_error: str | None = None,
    refused: dict[str, str] | None = None,
    stale: bool = False,
) -> dict[str, Any]:
    """One model's entry in a report (every key of MODEL_KEYS)."""
    return {
        "channel": channel,
        "revision": None if version is None else f"r-{version}",
        "version": version,
        "cohort_bucket": 17,
        "state": "running" if version else None,
        "pending": pending,
        "last_action": last_action,
        "last_error": last_error,
        "refused": refused or {},
        "health_latency_ms": 4.25,
        "stale": stale,
    }


@dataclass
class Unit:
    """A test device: a real identity key, the record an operator registers, its reports."""

    models: tuple[str, ...] = ("detector",)
    channel: str = "stable"
    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def device_id(self) -> str:
        return fleetreport.device_id_for(fleetreport.public_raw(self.key))

    def device(self, *, cohort: str = "default", at: float | None = None) -> Device:
        """The registration of this unit."""
        return Device(
            device_id=self.device_id,
            identity=fleetreport.public_raw(self.key),
            recipient="x25519:" + "ab" * 32,
            models=self.models,
            channel=self.channel,
            cohort=cohort,
            profile="generic-x86_64",
            architecture="x86_64",
            registered_at=time.time() if at is None else at,
        )

    def body(self, counter: int, models: dict[str, dict[str, Any]] | None = None) -> bytes:
        """A report body (checked by parse_report before it is returned)."""
        doc = {
            "format": fleetreport.REPORT_FORMAT,
            "format_version": fleetreport.FORMAT_VERSION,
            "device_id": self.device_id,
            "counter": counter,
            "time": 1_700_000_000 + counter,
            "agent_version": "0.1.0",
            "profile": "generic-x86_64",
            "architecture": "x86_64",
            "runtime": {"onnxruntime": "1.20.1"},
            "models": {m: entry(channel=self.channel) for m in self.models}
            if models is None
            else models,
        }
        raw = fleetreport.canonical(doc)
        fleetreport.parse_report(raw)
        assert fleetreport.verify(
            fleetreport.public_raw(self.key), raw, fleetreport.sign(self.key, raw)
        )
        return raw

    def send(
        self,
        store: FleetStore,
        counter: int,
        models: dict[str, dict[str, Any]] | None = None,
        *,
        at: float | None = None,
    ) -> bytes:
        """Ingest report ``counter`` as the service does after checking it; return its body."""
        raw = self.body(counter, models)
        store.ingest(
            self.device_id,
            counter,
            time.time() if at is None else at,
            fleetreport.parse_report(raw),
            raw,
        )
        return raw
