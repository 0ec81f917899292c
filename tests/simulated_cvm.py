"""Test helper: a measured SIMULATED CVM — the guest agent simulator's own boot — with hooks to tamper with
the evidence it presents to the KMS."""

from __future__ import annotations

from pathlib import Path

from cvm.agent_sim.agent import GuestAgentSimulator
from cvm.attest.eventlog import event_log_json, parse_event_log

KMS_ROOT_PLACEHOLDER = b"\x02" + b"\x11" * 32


class SimulatedCvm:
    def __init__(self, state_dir: Path, app_id: bytes, app_compose: bytes):
        self.agent = GuestAgentSimulator.measure_boot(app_compose, app_id, KMS_ROOT_PLACEHOLDER,
                                                      state_dir / "simulated-tdx")
        self.tamper_quote = None          # callable(bytes) -> bytes
        self.tamper_log = None            # callable(list[RuntimeEvent]) -> list[RuntimeEvent]
        self.report_data_override = None

    def attest(self, report_data: bytes) -> tuple[bytes, str]:
        quote, log = self.agent.attest(self.report_data_override or report_data)
        if self.tamper_log:
            log = event_log_json(self.tamper_log(parse_event_log(log)))
        return (self.tamper_quote(quote) if self.tamper_quote else quote), log
