"""SIMULATED dstack guest agent: boots like a CVM on the simulated TDX platform and serves dstack's
agent API (dstack-sdk 0.5.4 compatible) on a Unix socket. Everything it returns is labelled simulated,
and every quote it makes is a SIMULATED quote (:mod:`cvm.attest.simulated`).

Errors: :class:`AgentSimError` → :class:`AppKeyNotReady`, :class:`AppKeyGrantRejected`; caller
mistakes are ValueError/TypeError.
"""

from cvm.agent_sim.agent import (
    AgentSimError,
    AppKeyGrant,
    AppKeyGrantRejected,
    AppKeyNotReady,
    AppKeyProvider,
    Attest,
    DerivedKey,
    GuestAgentSimulator,
    Signed,
)
from cvm.agent_sim.server import SIMULATOR_VERSION, AgentServer, create_app

__all__ = [
    "SIMULATOR_VERSION",
    "AgentServer",
    "AgentSimError",
    "AppKeyGrant",
    "AppKeyGrantRejected",
    "AppKeyNotReady",
    "AppKeyProvider",
    "Attest",
    "DerivedKey",
    "GuestAgentSimulator",
    "Signed",
    "create_app",
]
