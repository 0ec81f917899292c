"""Where a study CVM runs: the backend interface (`process`) and the managed child processes it starts
(`launcher`). `python -m compose.backends` is the in-sandbox launcher (see `process`)."""

from compose.backends.launcher import (
    ManagedProcess,
    ServiceStartError,
    free_loopback_port,
)
from compose.backends.process import (
    RESULT_FILE,
    TERMINAL_STATES,
    Backend,
    BackendError,
    Isolation,
    LaunchFailed,
    LocalProcessBackend,
    RunHandle,
    RunState,
    RunStatus,
    boot_simulated_agent,
    bwrap_command,
)

__all__ = [
    "RESULT_FILE",
    "TERMINAL_STATES",
    "Backend",
    "BackendError",
    "Isolation",
    "LaunchFailed",
    "LocalProcessBackend",
    "ManagedProcess",
    "RunHandle",
    "RunState",
    "RunStatus",
    "ServiceStartError",
    "boot_simulated_agent",
    "bwrap_command",
    "free_loopback_port",
]
