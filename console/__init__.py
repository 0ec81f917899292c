"""The owners' approval console (issue 14), served by `seal up` on loopback: consortium overview, recipe review
with the compose hash recomputed in the browser, EIP-712 co-signing relayed by the server, and final revocation."""

from console.app import CSP, ConsoleConfig, create_app

__all__ = ["CSP", "ConsoleConfig", "create_app"]
