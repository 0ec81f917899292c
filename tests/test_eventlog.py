"""RTMR3 runtime events: dstack's V1 digest, replay, the JSON log format, and replay_event_log's refusals."""

import hashlib
import json

import pytest
from dstack_sdk.dstack_client import replay_rtmr as sdk_replay_rtmr

from cvm.attest.eventlog import (
    DSTACK_RUNTIME_EVENT_TYPE,
    EventLogMismatch,
    RuntimeEvent,
    event_log_json,
    parse_event_log,
    replay_event_log,
    replay_rtmr,
    runtime_event_digest,
)
from cvm.attest.tdx_quote import AttestationError

APP_ID = bytes.fromhex("8f2cf602c9695b23130367ed78d8f557554de7c5")
COMPOSE_HASH = hashlib.sha256(b'{"manifest_version":2,"name":"study"}').digest()
INSTANCE_ID = hashlib.sha256(b"seed" + APP_ID).digest()[:20]
OS_IMAGE_HASH = hashlib.sha256(b"os image").digest()
KEY_PROVIDER = json.dumps({"name": "kms", "id": "02" + "ab" * 32}).encode()


def boot_events(**overrides: bytes) -> list[RuntimeEvent]:
    """dstack's boot order (docs/design.md, "dstack formats"), payloads overridable by event name."""
    payloads = {
        "system-preparing": b"",
        "app-id": APP_ID,
        "compose-hash": COMPOSE_HASH,
        "instance-id": INSTANCE_ID,
        "boot-mr-done": b"",
        "os-image-hash": OS_IMAGE_HASH,
        "key-provider": KEY_PROVIDER,
        "system-ready": b"",
    }
    payloads.update({name.replace("_", "-"): value for name, value in overrides.items()})
    return [RuntimeEvent.measure(name, payload) for name, payload in payloads.items()]


def log_and_rtmr3(events: list[RuntimeEvent]) -> tuple[str, bytes]:
    return event_log_json(events), replay_rtmr(e.digest for e in events)


def test_digest_is_dstack_v1():
    # u32_le(0x08000001) = 01 00 00 08, then ":" name ":" payload.
    expected = hashlib.sha384(b"\x01\x00\x00\x08:app-id:" + APP_ID).digest()
    assert runtime_event_digest("app-id", APP_ID) == expected
    assert runtime_event_digest("system-ready", b"") == hashlib.sha384(b"\x01\x00\x00\x08:system-ready:").digest()


def test_digest_rejects_bad_arguments():
    with pytest.raises(TypeError):
        runtime_event_digest("app-id", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        runtime_event_digest("", b"x")


def test_replay_starts_from_zeros_and_matches_dstack_sdk():
    assert replay_rtmr([]) == bytes(48)
    digests = [e.digest for e in boot_events()]
    assert replay_rtmr(digests[:1]) == hashlib.sha384(bytes(48) + digests[0]).digest()
    assert replay_rtmr(digests).hex() == sdk_replay_rtmr([d.hex() for d in digests])
    with pytest.raises(ValueError, match="48 bytes"):
        replay_rtmr([b"short"])


def test_entries_round_trip_through_dstack_json():
    events = boot_events()
    entries = json.loads(event_log_json(events))
    assert entries[1] == {
        "imr": 3,
        "event_type": DSTACK_RUNTIME_EVENT_TYPE,
        "digest": events[1].digest.hex(),
        "event": "app-id",
        "event_payload": APP_ID.hex(),
    }
    assert parse_event_log(event_log_json(events)) == events
    assert parse_event_log(entries) == events


def test_runtime_event_validates_its_fields():
    with pytest.raises(ValueError, match="digest"):
        RuntimeEvent(name="x", payload=b"", digest=b"\x00" * 47)
    with pytest.raises(ValueError, match="imr"):
        RuntimeEvent(name="x", payload=b"", digest=bytes(48), imr=4)


def test_replay_event_log_returns_values_from_the_log():
    log, rtmr3 = log_and_rtmr3(boot_events())
    boot = replay_event_log(log, rtmr3)
    assert boot.app_id == APP_ID
    assert boot.compose_hash == COMPOSE_HASH
    assert boot.instance_id == INSTANCE_ID
    assert boot.os_image_hash == OS_IMAGE_HASH
    assert boot.key_provider == {"name": "kms", "id": "02" + "ab" * 32}
    assert boot.key_provider_info == KEY_PROVIDER
    assert boot.rtmr3 == rtmr3
    assert boot.app_events == ()


def test_optional_boot_values_may_be_absent():
    events = [e for e in boot_events() if e.name not in ("instance-id", "os-image-hash", "key-provider")]
    boot = replay_event_log(*log_and_rtmr3(events))
    assert (boot.instance_id, boot.os_image_hash, boot.key_provider, boot.key_provider_info) == (None, None, None, b"")


def test_events_after_system_ready_are_app_events_and_change_no_boot_value():
    forged = RuntimeEvent.measure("compose-hash", hashlib.sha256(b"another recipe").digest())
    events = boot_events() + [RuntimeEvent.measure("result-digest", b"\x01" * 32), forged]
    boot = replay_event_log(*log_and_rtmr3(events))
    assert boot.compose_hash == COMPOSE_HASH
    assert [e.name for e in boot.app_events] == ["result-digest", "compose-hash"]


def test_rtmr0_to_2_entries_do_not_enter_the_rtmr3_replay():
    firmware = RuntimeEvent(name="firmware", payload=b"", digest=hashlib.sha384(b"fw").digest(), imr=0, event_type=1)
    events = boot_events()
    log, rtmr3 = event_log_json([firmware, *events]), replay_rtmr(e.digest for e in events)
    assert replay_event_log(log, rtmr3).app_id == APP_ID


# Each refusal: (what is wrong, how the log is built, the reason the error must give).
def _tampered_payload() -> tuple[str, bytes]:
    events = boot_events()
    log, rtmr3 = log_and_rtmr3(events)
    entries = json.loads(log)
    entries[2]["event_payload"] = hashlib.sha256(b"another recipe").hexdigest()  # digest left as it was
    return json.dumps(entries), rtmr3


def _reordered() -> tuple[str, bytes]:
    events = boot_events()
    rtmr3 = replay_rtmr(e.digest for e in events)
    events[1], events[2] = events[2], events[1]
    return event_log_json(events), rtmr3


def _without(name: str) -> tuple[str, bytes]:
    return log_and_rtmr3([e for e in boot_events() if e.name != name])


def _duplicated(name: str) -> tuple[str, bytes]:
    events = boot_events()
    index = next(i for i, e in enumerate(events) if e.name == name)
    events.insert(index, events[index])
    return log_and_rtmr3(events)


def _foreign_event_type() -> tuple[str, bytes]:
    events = boot_events()
    odd = RuntimeEvent(name="app-id", payload=APP_ID, digest=events[1].digest, event_type=0x80000001)
    events[1] = odd
    return log_and_rtmr3(events)


REFUSALS = {
    "payload swapped under a genuine digest": (_tampered_payload, "digest of event 'compose-hash' does not match"),
    "events reordered": (_reordered, "does not give the quote's RTMR3"),
    "wrong rtmr3": (lambda: (log_and_rtmr3(boot_events())[0], b"\x01" * 48), "does not give the quote's RTMR3"),
    "app-id missing": (lambda: _without("app-id"), "'app-id' is missing"),
    "compose-hash missing": (lambda: _without("compose-hash"), "'compose-hash' is missing"),
    "app-id duplicated": (lambda: _duplicated("app-id"), "'app-id' appears more than once"),
    "compose-hash duplicated": (lambda: _duplicated("compose-hash"), "'compose-hash' appears more than once"),
    "instance-id duplicated": (lambda: _duplicated("instance-id"), "'instance-id' appears more than once"),
    "app-id of 32 bytes": (lambda: log_and_rtmr3(boot_events(app_id=bytes(32))), "'app-id' payload is 32 bytes"),
    "compose-hash of 20 bytes": (
        lambda: log_and_rtmr3(boot_events(compose_hash=bytes(20))),
        "'compose-hash' payload is 20 bytes",
    ),
    "key-provider not JSON": (lambda: log_and_rtmr3(boot_events(key_provider=b"\xff{")), "key-provider payload is not"),
    "key-provider not an object": (lambda: log_and_rtmr3(boot_events(key_provider=b"[1]")), "not a JSON object"),
    "runtime entry of another event type": (_foreign_event_type, "digest of event 'app-id' does not match"),
    "not JSON": (lambda: ("[{", bytes(48)), "not valid JSON"),
    "not a list": (lambda: ('{"imr": 3}', bytes(48)), "not a JSON list"),
    "entry not an object": (lambda: ("[3]", bytes(48)), "not a JSON object"),
    "entry without digest": (
        lambda: (json.dumps([{"imr": 3, "event_type": 1, "event": "x", "event_payload": ""}]), bytes(48)),
        "lacks the field 'digest'",
    ),
    "digest not hex": (
        lambda: (json.dumps([{"imr": 3, "event_type": 1, "event": "x", "digest": "zz"}]), bytes(48)),
        "digest is not valid hex",
    ),
    "imr not an integer": (
        lambda: (json.dumps([{"imr": "3", "event_type": 1, "event": "x", "digest": "00" * 48}]), bytes(48)),
        "non-integer imr",
    ),
    "digest of 47 bytes": (
        lambda: (json.dumps([{"imr": 3, "event_type": 1, "event": "x", "digest": "00" * 47}]), bytes(48)),
        "digest must be 48 bytes",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_replay_event_log_refuses(case):
    build, reason = REFUSALS[case]
    log, rtmr3 = build()
    with pytest.raises(EventLogMismatch, match=reason) as refused:
        replay_event_log(log, rtmr3)
    assert isinstance(refused.value, AttestationError)
    assert reason in refused.value.reason


def test_replay_event_log_rejects_a_malformed_expected_rtmr3():
    with pytest.raises(ValueError, match="48 bytes"):
        replay_event_log(log_and_rtmr3(boot_events())[0], b"\x00" * 32)
