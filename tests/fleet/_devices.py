"""Real devices for the fleet tests: a fresh Ed25519 identity, its enrolment record, signed reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgepack import fleetreport


def model_entry(
    *,
    channel: str = "stable",
    version: str | None = "1.0.0",
    revision: str | None = "r1",
    state: str | None = "running",
    pending: str | None = None,
    last_action: str | None = "none",
    last_error: str | None = None,
    refused: dict[str, str] | None = None,
    stale: bool = False,
) -> dict[str, Any]:
    """One model's entry in a report."""
    return {
        "channel": channel,
        "revision": revision,
        "version": version,
        "cohort_bucket": 42,
        "state": state,
        "pending": pending,
        "last_action": last_action,
        "last_error": last_error,
        "refused": refused or {},
        "health_latency_ms": 3.5,
        "stale": stale,
    }


@dataclass
class FakeDevice:
    """A device with a real identity key; it builds and signs reports like the agent."""

    models: list[str] = field(default_factory=lambda: ["detector"])
    channel: str = "stable"
    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)
    counter: int = 0

    @property
    def device_id(self) -> str:
        """The id derived from the identity key."""
        return fleetreport.device_id_for(fleetreport.public_raw(self.key))

    def record(self) -> dict[str, Any]:
        """The signed enrolment record an operator registers."""
        recipient = (
            x25519.X25519PrivateKey.generate()
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        return fleetreport.make_record(
            self.key,
            {
                "device_id": self.device_id,
                "identity": "ed25519:" + fleetreport.public_raw(self.key).hex(),
                "recipient": "x25519:" + recipient.hex(),
                "models": list(self.models),
                "channel": self.channel,
                "cohort": "default",
                "profile": "generic-x86_64",
                "architecture": "x86_64",
                "agent_version": "0.1.0",
            },
        )

    def record_bytes(self) -> bytes:
        """The record as the device writes it."""
        return fleetreport.canonical(self.record())

    def report(
        self, models: dict[str, dict[str, Any]] | None = None, *, counter: int | None = None
    ) -> bytes:
        """The body of a new report (next counter unless given)."""
        if counter is None:
            self.counter += 1
            counter = self.counter
        doc = {
            "format": fleetreport.REPORT_FORMAT,
            "format_version": fleetreport.FORMAT_VERSION,
            "device_id": self.device_id,
            "counter": counter,
            "time": time.time(),
            "agent_version": "0.1.0",
            "profile": "generic-x86_64",
            "architecture": "x86_64",
            "runtime": {"python": "3.11", "onnxruntime": "1.20"},
            "models": models
            if models is not None
            else {m: model_entry(channel=self.channel) for m in self.models},
        }
        return fleetreport.canonical(doc)

    def sign(self, body: bytes) -> str:
        """The Edgepack-Signature header for ``body``."""
        return fleetreport.sign(self.key, body)
