"""Test helper: a measured SIMULATED CVM — the guest agent simulator's own boot — with hooks to tamper with
the evidence it presents to the KMS."""

from __future__ import annotations

from pathlib import Path

from compose.stack_file import StackDescription
from cvm.agent_sim.agent import GuestAgentSimulator
from cvm.attest.eventlog import event_log_json, parse_event_log
from cvm.attest.simulated import SIMULATED_OS_IMAGE, SimulatedOsImage
from kms_client.client import KmsClient

KMS_ROOT_PLACEHOLDER = b"\x02" + b"\x11" * 32   # a key provider that is no KMS of the stack's


def stack_kms_root(state_dir: Path) -> bytes:
    """The root public key of the KMS the stack in ``state_dir`` runs (what its CVMs measure as key-provider)."""
    with KmsClient(StackDescription.load(state_dir).services["kms"]["url"]) as kms:
        return bytes.fromhex(kms.meta().k256_pubkey)


class SimulatedCvm:
    """A CVM of the stack in ``state_dir``: it measures that stack's KMS as its key provider (or ``kms_root``) and
    boots ``os_image`` (the stack's simulated image by default)."""

    def __init__(self, state_dir: Path, app_id: bytes, app_compose: bytes, *, kms_root: bytes | None = None,
                 os_image: SimulatedOsImage = SIMULATED_OS_IMAGE):
        root = kms_root if kms_root is not None else stack_kms_root(state_dir)
        self.agent = GuestAgentSimulator.measure_boot(app_compose, app_id, root, state_dir / "simulated-tdx",
                                                      os_image=os_image)
        self.tamper_quote = None          # callable(bytes) -> bytes
        self.tamper_log = None            # callable(list[RuntimeEvent]) -> list[RuntimeEvent]
        self.report_data_override = None

    def attest(self, report_data: bytes) -> tuple[bytes, str]:
        quote, log = self.agent.attest(self.report_data_override or report_data)
        if self.tamper_log:
            log = event_log_json(self.tamper_log(parse_event_log(log)))
        return (self.tamper_quote(quote) if self.tamper_quote else quote), log
