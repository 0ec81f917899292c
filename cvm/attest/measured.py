"""What this CVM is measured to run: the recipe as the guest agent reports it, checked against its own hash."""

from __future__ import annotations

from dstack_sdk import DstackClient

from compose.app_compose import compose_hash as hash_app_compose


class MeasuredRecipeMismatch(Exception):
    """The agent's app-compose.json does not hash to the compose hash it measured."""


def measured_recipe(dstack: DstackClient) -> tuple[bytes, bytes, bytes]:
    """(app_id, compose_hash, app-compose.json bytes) as this CVM is measured."""
    info = dstack.info()
    app_compose = info.tcb_info.app_compose.encode()
    compose_hash = bytes.fromhex(info.compose_hash)
    if hash_app_compose(app_compose) != compose_hash:
        raise MeasuredRecipeMismatch("the agent's app-compose.json does not hash to the measured compose hash")
    return bytes.fromhex(info.app_id), compose_hash, app_compose
