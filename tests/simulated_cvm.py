"""Test helper: attestations from a SIMULATED CVM booted for (app_id, compose_hash), with hooks to tamper.

It measures the same runtime events a dstack CVM does (cvm.eventlog) and quotes with the stack's simulated
TDX platform, so the KMS sees exactly what the guest-agent simulator would send.
"""

from __future__ import annotations

import json
from pathlib import Path

from cvm.eventlog import RuntimeEvent, event_log_json, replay_rtmr
from cvm.sim_tdx import SIMULATED_OS_IMAGE_HASH, SimulatedTdx, mr_config_id_v1


def boot_events(app_id: bytes, compose_hash: bytes, kms_root: bytes = b"\x02" * 33) -> list[RuntimeEvent]:
    key_provider = json.dumps({"name": "kms", "id": kms_root.hex()}, separators=(",", ":")).encode()
    return [RuntimeEvent.measure(name, payload) for name, payload in (
        ("system-preparing", b""), ("app-id", app_id), ("compose-hash", compose_hash),
        ("instance-id", b"\x07" * 20), ("boot-mr-done", b""), ("os-image-hash", SIMULATED_OS_IMAGE_HASH),
        ("key-provider", key_provider), ("system-ready", b""),
    )]


class SimulatedCvm:
    def __init__(self, state_dir: Path, app_id: bytes, compose_hash: bytes):
        self.tdx = SimulatedTdx.load_or_create(state_dir / "simulated-tdx")
        self.compose_hash = compose_hash
        self.events = boot_events(app_id, compose_hash)
        self.tamper_quote = None      # callable(bytes) -> bytes
        self.tamper_log = None        # callable(list[RuntimeEvent]) -> list[RuntimeEvent]
        self.report_data_override = None

    def attest(self, report_data: bytes) -> tuple[bytes, str]:
        rtmr3 = replay_rtmr(e.digest for e in self.events)
        quote = self.tdx.make_quote(self.report_data_override or report_data, rtmr3=rtmr3,
                                    mr_config_id=mr_config_id_v1(self.compose_hash))
        events = self.tamper_log(list(self.events)) if self.tamper_log else self.events
        return (self.tamper_quote(quote) if self.tamper_quote else quote), event_log_json(events)
