"""The OS is part of the measurement (issue 11, part 1): a quote is served only when the OS image it names in RTMR3
is registered with the KMS and its MRTD and RTMR0-2 are that image's measurements, and only when its key-provider
event names this KMS. The finding reproduced and refused: a quote with other MRTD/RTMR0-2 whose log claims the
allowed image got the app key and the owners' keys, and ε was spent. Checked at the KMS (GetAppKey, owner key
release: nothing spent), by `seal verify` (link 2), on the record format, and on Intel's real sample quote at its
pinned time. One local stack and one study run per module."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

import auditor.links.event_log as event_log_link
import auditor.links.quote as quote_link
from auditor.links.base import Broken, Pins
from auditor.receipt import parse_receipt
from auditor.verify import LinkStatus, verify_receipt
from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from contracts.chain import Chain, DstackApp, DstackKms
from cvm.attest.eventlog import RuntimeEvent, parse_event_log, replay_rtmr
from cvm.attest.os_image import (
    OS_MEASUREMENT_FORMAT,
    OsImageRegistry,
    OsMeasurementMismatch,
    OsRecordConflict,
    OsRecordInvalid,
    UnknownOsImage,
    check_measurements,
    load_record,
    parse_record,
)
from cvm.attest.simulated import (
    SIMULATED_MRTD,
    SIMULATED_OS_IMAGE,
    SIMULATED_OS_IMAGE_HASH,
    SIMULATED_RTMR1,
    SimulatedOsImage,
    SimulatedTdx,
    mr_config_id_v1,
)
from cvm.attest.tdx_quote import parse_quote_unverified
from cvm.attest.verify import verify_quote
from kms.keys import generate_root_keys
from kms.service import KeyManagementService, Refused
from kms_client import wire
from kms_client.box import attestation_report_data
from kms_client.client import KmsClient, KmsRefused
from sealing_cli.devchain import ANVIL_FUNDER_KEY
from sealing_cli.main import app as seal_cli
from sealing_cli.os_images import kms_os_images_dir
from tests.simulated_cvm import KMS_ROOT_PLACEHOLDER, SimulatedCvm
from tests.study_world import build_study_world, start_study_stack
from tests.test_verify_real_quote import COLLATERAL, FIXTURES, PINNED_NOW

REGISTERS = ("mrtd", "rtmr0", "rtmr1", "rtmr2")
NAMES = {"mrtd": "MRTD", "rtmr0": "RTMR0", "rtmr1": "RTMR1", "rtmr2": "RTMR2"}
REAL_RECORD = Path(__file__).resolve().parent / "fixtures" / "os-images" / "tdx_quote.os-measurement.json"
YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "5" * 64 + "\n"
runner = CliRunner()


def flip(value: bytes) -> bytes:
    return bytes([value[0] ^ 1]) + value[1:]


def resigned(platform: SimulatedTdx, quote: bytes, **registers: bytes) -> bytes:
    """The same quote (report data, RTMR3, MRCONFIGID) signed again by the simulated platform, with other boot
    registers: what a host that boots another firmware, kernel or initrd presents with a genuine-looking log."""
    body = parse_quote_unverified(quote).body
    values = {field: registers.get(field, getattr(body, field)) for field in REGISTERS}
    return platform.make_quote(body.report_data, rtmr3=body.rtmr3, mr_config_id=body.mr_config_id, **values)


# ---- fixtures: one stack, one study run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("os-gate")) as stack:
        yield build_study_world(stack)


@pytest.fixture(scope="module")
def stack(world):
    return world.stack


@pytest.fixture(scope="module")
def platform(stack):
    return SimulatedTdx.load_or_create(stack.state_dir / "simulated-tdx")


@pytest.fixture
def study(stack, world):
    """A fresh 2-of-2 study (ε budget 1.0) of the stack's owners, registered in its DstackKms."""
    funder = Account.from_key(ANVIL_FUNDER_KEY)
    app = DstackApp.deploy(stack.chain, funder, owners=[o.address for o in world.owners.values()], threshold=2,
                           epsilon_budget=1.0, kms_signer=stack.description.kms_signer)
    DstackKms(stack.chain, stack.description.dstack_kms).register_app(app.address, funder)
    return app


@pytest.fixture
def kms(stack):
    with KmsClient(stack.description.services["kms"]["url"]) as client:
        yield client


def approved_recipe(study: DstackApp, owners: dict, tag: str) -> bytes:
    manifest = StudyManifest.model_validate({
        "study": f"os-gate-{tag}", "inputs": [{"owner": o.address, "name": f"cohort-{n}"} for n, o in owners.items()],
        "analysis": {"kind": "dp_stats", "params": {}}, "epsilon": 0.4, "delta": 1e-6,
        "output_type": "aggregate_stats"})
    body = normalized_json_bytes(build_app_compose("os-gate", YAML, manifest))
    h = compose_hash(body)
    first = next(iter(owners.values()))
    study.propose(h, "", first)
    for owner in owners.values():
        study.approve(h, owner)
    return body


# ---- the record format and the registry -----------------------------------------------------------------------------


def test_a_record_recomputes_its_image_hash_from_sha256sum():
    record = SIMULATED_OS_IMAGE.measurement_record()
    assert record.os_image_hash == hashlib.sha256(record.sha256sum.encode()).digest() == SIMULATED_OS_IMAGE_HASH
    assert parse_record(record.to_bytes()) == record
    document = record.to_json()
    assert document["format"] == OS_MEASUREMENT_FORMAT and len(bytes.fromhex(document["rtmr2"])) == 48
    digest_only = {k: v for k, v in document.items() if k != "sha256sum"} | {
        "sha256sum_sha256": document["os_image_hash"].upper(), "mrtd": "0x" + document["mrtd"]}
    assert parse_record(digest_only).mrtd == record.mrtd


@pytest.mark.parametrize("change, reason", [
    ({"sha256sum": "00  bzImage\n"}, "but sha256(sha256sum) is"),
    ({"sha256sum_sha256": "11" * 32}, "but sha256sum_sha256 is"),
    ({"sha256sum": None}, "needs sha256sum"),
    ({"rtmr1": "00" * 47}, "rtmr1 must be 48 bytes of hex"),
    ({"mrtd": "zz" * 48}, "mrtd must be 48 bytes of hex"),
    ({"os_image_hash": 7}, "os_image_hash must be a hex string"),
    ({"format": "sealroom-os-measurement/v2"}, "format must be"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"vm_shape": "2 cpus"}, "unknown field(s) in the measurement record: vm_shape"),
], ids=["hash-vs-text", "hash-vs-digest", "no-sha256sum", "short-register", "not-hex", "hash-kind", "format",
        "no-name", "unknown-field"])
def test_a_bad_record_is_refused_with_its_reason(change, reason):
    document = {k: v for k, v in (SIMULATED_OS_IMAGE.measurement_record().to_json() | change).items() if v is not None}
    with pytest.raises(OsRecordInvalid) as refused:
        parse_record(document)
    assert reason in str(refused.value)
    with pytest.raises(OsRecordInvalid, match="not JSON"):
        parse_record("{")


def test_the_registry_keeps_a_record_once_and_never_replaces_it(tmp_path):
    registry = OsImageRegistry(tmp_path / "os-images")
    record = SIMULATED_OS_IMAGE.measurement_record()
    assert registry.get(record.os_image_hash) is None
    assert registry.register(record) is True and registry.register(record) is False
    assert (tmp_path / "os-images" / f"{record.os_image_hash.hex()}.json").read_bytes() == record.to_bytes()
    assert OsImageRegistry(tmp_path / "os-images").get(record.os_image_hash) == record   # another reader sees it
    with pytest.raises(OsRecordConflict, match="never replaced"):
        registry.register(dataclasses.replace(record, rtmr1=flip(record.rtmr1)))
    assert registry.gate(record.os_image_hash, record) == record


def test_a_broken_registry_fails_closed(tmp_path):
    folder = tmp_path / "os-images"
    registry = OsImageRegistry(folder)
    record = SIMULATED_OS_IMAGE.measurement_record()
    registry.register(record)
    (folder / ("00" * 32 + ".json")).write_bytes(record.to_bytes())   # a record filed under another hash
    with pytest.raises(OsRecordInvalid, match="must be named"):
        registry.get(record.os_image_hash)


# ---- the simulated platform boots a described image ----------------------------------------------------------------


def test_the_simulated_measurements_follow_the_image_files():
    kernel_swapped = SimulatedOsImage.describe("other", "1", {
        "ovmf.fd": b"sealroom simulated TDX virtual firmware (OVMF)", "bzImage": b"a kernel with a backdoor",
        "initramfs.cpio.gz": b"sealroom simulated dstack initramfs",
        "metadata.json": b'{"cmdline":"console=ttyS0 sealroom-simulated dstack.rootfs_hash=simulated"}',
        "rootfs.img.verity": b"sealroom simulated dstack rootfs (dm-verity)"})
    assert kernel_swapped.os_image_hash != SIMULATED_OS_IMAGE_HASH
    assert kernel_swapped.mrtd == SIMULATED_MRTD and kernel_swapped.rtmr(0) == SIMULATED_OS_IMAGE.rtmr(0)
    assert kernel_swapped.rtmr(1) != SIMULATED_RTMR1 and kernel_swapped.rtmr(2) == SIMULATED_OS_IMAGE.rtmr(2)
    with pytest.raises(OsMeasurementMismatch, match="^RTMR1 of the quote is"):
        check_measurements(SIMULATED_OS_IMAGE.measurement_record(), kernel_swapped.measurement_record())
    with pytest.raises(ValueError, match="lists exactly"):
        SimulatedOsImage("x", "1", "00" * 32 + "  bzImage\n")


def test_the_agent_quotes_the_image_it_booted(tmp_path):
    other = SimulatedOsImage.describe("other", "1", {name: name.encode() * 2 for name in (
        "ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json", "rootfs.img.verity")})
    cvm = SimulatedCvm(tmp_path, b"\x01" * 20, b'{"name":"x"}', kms_root=KMS_ROOT_PLACEHOLDER, os_image=other)
    quote, log = cvm.attest(bytes(64))
    body = parse_quote_unverified(quote).body
    check_measurements(other.measurement_record(), body)
    assert cvm.agent.os_image_hash == other.os_image_hash
    entries = parse_event_log(log)
    assert all(replay_rtmr(e.digest for e in entries if e.imr == i) == other.rtmr(i) for i in range(3))


# ---- the KMS --------------------------------------------------------------------------------------------------------


def test_seal_up_registered_the_simulated_image_with_the_kms_and_on_chain(stack):
    record = OsImageRegistry(kms_os_images_dir(stack.state_dir)).get(SIMULATED_OS_IMAGE_HASH)
    assert record == SIMULATED_OS_IMAGE.measurement_record()
    registry = DstackKms(stack.chain, stack.description.dstack_kms)
    assert stack.chain.view(registry.ARTIFACT, registry.contract, "allowedOsImages", SIMULATED_OS_IMAGE_HASH)


def test_the_good_boot_gets_its_keys(stack, study, world, kms):
    body = approved_recipe(study, world.owners, "good")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    assert len(kms.get_app_key(machine.attest, app_id=study.app_id).k256_key) == 32
    release = kms.release_owner_keys(machine.attest, body)
    assert set(release.keys) == {o.address for o in world.owners.values()}
    assert study.budget().spent_micro == 400_000


@pytest.mark.parametrize("register", REGISTERS)
def test_a_quote_with_another_boot_register_is_refused_and_spends_nothing(stack, study, world, kms, platform,
                                                                          register):
    body = approved_recipe(study, world.owners, f"forged-{register}")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    genuine = getattr(SIMULATED_OS_IMAGE.measurement_record(), register)
    machine.tamper_quote = lambda quote: resigned(platform, quote, **{register: flip(genuine)})
    expected = (f"{NAMES[register]} of the quote is {flip(genuine).hex()} but OS image "
                f"{SIMULATED_OS_IMAGE.name} {SIMULATED_OS_IMAGE.version} (os_image_hash "
                f"{SIMULATED_OS_IMAGE_HASH.hex()}) expects {genuine.hex()}")
    with pytest.raises(KmsRefused) as app_key:
        kms.get_app_key(machine.attest, app_id=study.app_id)
    with pytest.raises(KmsRefused) as owner_keys:
        kms.release_owner_keys(machine.attest, body)
    for refused in (app_key.value, owner_keys.value):
        assert refused.code == "bad_quote" and expected in str(refused)
    assert study.budget().spent_micro == 0


def test_the_reproduced_finding_random_boot_registers_get_nothing(stack, study, world, kms, platform):
    """MRTD and RTMR0-2 random, the log claiming the allowed image: no app key, no owner key, no ε spent."""
    body = approved_recipe(study, world.owners, "random")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    machine.tamper_quote = lambda quote: resigned(platform, quote, **{r: os.urandom(48) for r in REGISTERS})
    with pytest.raises(KmsRefused, match="MRTD of the quote .*; RTMR0 .*; RTMR1 .*; RTMR2 of the quote"):
        kms.get_app_key(machine.attest, app_id=study.app_id)
    with pytest.raises(KmsRefused, match="MRTD of the quote"):
        kms.release_owner_keys(machine.attest, body)
    assert study.budget().spent_micro == 0


def test_a_key_provider_naming_another_kms_is_refused(stack, study, world, kms):
    body = approved_recipe(study, world.owners, "other-kms")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body, kms_root=KMS_ROOT_PLACEHOLDER)
    for call in (lambda: kms.get_app_key(machine.attest, app_id=study.app_id),
                 lambda: kms.release_owner_keys(machine.attest, body)):
        with pytest.raises(KmsRefused, match=f"key-provider event names .*{KMS_ROOT_PLACEHOLDER.hex()}.*, not this "
                                             "KMS") as refused:
            call()
        assert refused.value.code == "bad_quote"
    assert study.budget().spent_micro == 0


def test_an_unregistered_image_is_refused_until_seal_os_register(stack, study, world, kms, tmp_path):
    """An image DstackKms allows but the KMS holds no measurements for is refused; `seal os register FILE` gives
    the running KMS its record (and allows it on-chain), and then its CVMs are served."""
    image = SimulatedOsImage.describe("sealroom-simulated-dstack-os", "0.5.5-sim", {
        name: f"{name} of 0.5.5".encode() for name in (
            "ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json", "rootfs.img.verity")})
    DstackKms(stack.chain, stack.description.dstack_kms).allow_os_image(image.os_image_hash,
                                                                        Account.from_key(ANVIL_FUNDER_KEY))
    body = approved_recipe(study, world.owners, "new-image")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body, os_image=image)
    with pytest.raises(KmsRefused, match=f"no measurement record is registered for OS image "
                                         f"{image.os_image_hash.hex()}") as refused:
        kms.release_owner_keys(machine.attest, body)
    assert refused.value.code == "unknown_app" and study.budget().spent_micro == 0

    record_file = tmp_path / "release.json"
    record_file.write_bytes(image.measurement_record().to_bytes())
    registered = runner.invoke(seal_cli, ["os", "register", str(record_file), "--state-dir", str(stack.state_dir),
                                          "--json"])
    assert registered.exit_code == 0, registered.output
    assert json.loads(registered.stdout) | {"record": None} == {
        "os_image_hash": image.os_image_hash.hex(), "name": image.name, "version": image.version, "record": None,
        "newly_recorded": True, "newly_allowed": False}
    assert len(kms.get_app_key(machine.attest, app_id=study.app_id).k256_key) == 32
    again = runner.invoke(seal_cli, ["os", "register", str(record_file), "--state-dir", str(stack.state_dir)])
    assert again.exit_code == 0 and "already registered" in again.stdout

    # A different record for an image the KMS already holds is refused, and nothing changes.
    forged = image.measurement_record().to_json() | {"rtmr1": flip(image.rtmr(1)).hex()}
    record_file.write_text(json.dumps(forged))
    conflict = runner.invoke(seal_cli, ["os", "register", str(record_file), "--state-dir", str(stack.state_dir)])
    assert conflict.exit_code == 1 and "never replaced" in conflict.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(forged | {"os_image_hash": "00" * 32}))
    unusable = runner.invoke(seal_cli, ["os", "register", str(bad), "--state-dir", str(stack.state_dir)])
    assert unusable.exit_code == 2 and "sha256(sha256sum)" in unusable.stderr


class ChainSpy:
    """DstackKms as the KMS sees it, recording whether it was asked."""

    def __init__(self) -> None:
        self.asked = 0

    def is_app_allowed(self, _boot_info: tuple, **_at_block) -> tuple[bool, str]:
        self.asked += 1
        return True, ""


def test_the_gate_runs_before_the_chain_is_asked(stack, platform):
    """In process: a refused boot never reaches the chain (so nothing can be spent); a good one does."""
    root, spy = generate_root_keys(), ChainSpy()
    service = KeyManagementService(
        root=root, chain=stack.chain, registry=spy, dev_mode=True, signer=None,
        simulated_root_der=(stack.state_dir / "simulated-tdx" / "root.der").read_bytes(),
        os_images=OsImageRegistry(records=[SIMULATED_OS_IMAGE.measurement_record()]))
    machine = SimulatedCvm(stack.state_dir, b"\x02" * 20, b'{"name":"spy"}', kms_root=root.root_public_key_compressed)

    def request(tamper=None) -> wire.Attestation:
        nonce, pub = bytes.fromhex(service.issue_nonce().nonce), b"\x09" * 32
        quote, log = machine.attest(attestation_report_data(nonce, pub))
        return wire.Attestation(quote=(tamper(quote) if tamper else quote).hex(), event_log=log, nonce=nonce.hex(),
                                ephemeral_pubkey=pub.hex())

    with pytest.raises(Refused, match="RTMR2 of the quote") as refused:
        service.get_app_key(request(lambda q: resigned(platform, q, rtmr2=os.urandom(48))))
    assert refused.value.code == "bad_quote" and spy.asked == 0
    without_records = KeyManagementService(root=root, chain=stack.chain, registry=spy, dev_mode=True, signer=None,
                                           simulated_root_der=service.simulated_root_der)
    nonce, pub = bytes.fromhex(without_records.issue_nonce().nonce), b"\x09" * 32
    quote, log = machine.attest(attestation_report_data(nonce, pub))
    with pytest.raises(Refused, match="no measurement record") as refused:
        without_records.get_app_key(wire.Attestation(quote=quote.hex(), event_log=log, nonce=nonce.hex(),
                                                     ephemeral_pubkey=pub.hex()))
    assert refused.value.code == "unknown_app" and spy.asked == 0
    service.get_app_key(request())
    assert spy.asked == 1


def test_the_gate_costs_microseconds(stack):
    """The release-latency budget (p50 ≤ 20 ms) is untouched: a stat, a dict lookup and four comparisons."""
    registry = OsImageRegistry(kms_os_images_dir(stack.state_dir))
    record = SIMULATED_OS_IMAGE.measurement_record()
    registry.gate(SIMULATED_OS_IMAGE_HASH, record)
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        registry.gate(SIMULATED_OS_IMAGE_HASH, record)
    assert (time.perf_counter() - start) / rounds < 0.001


# ---- the auditor: seal verify ---------------------------------------------------------------------------------------


def rebooted(world, platform: SimulatedTdx, **registers: bytes) -> dict:
    """The study's receipt with a fresh quote over the same envelope and RTMR3, but other boot registers."""
    receipt = world.receipt
    rtmr3 = replay_rtmr(e.digest for e in parse_event_log(receipt["event_log"]) if e.imr == 3)
    values = {field: registers.get(field, getattr(SIMULATED_OS_IMAGE.measurement_record(), field))
              for field in REGISTERS}
    quote = platform.make_quote(bytes.fromhex(receipt["envelope_digest"]).ljust(64, b"\0"), rtmr3=rtmr3,
                                mr_config_id=mr_config_id_v1(world.compose_hash), **values)
    return {**receipt, "quote": quote.hex()}


def verify(world, receipt: dict, **options):
    with Chain(world.stack.description.rpc_url) as chain:
        return verify_receipt(receipt, now=int(time.time()), chain=chain, allow_simulated=True,
                              simulated_root_der=world.simulated_root_der,
                              kms_root=world.stack.description.services["kms"]["root_address"], **options)


def test_seal_verify_checks_the_os_against_the_stacks_records(world):
    result = runner.invoke(seal_cli, ["verify", str(world.receipt_path), "--allow-simulated", "--json",
                                      "--state-dir", str(world.stack.state_dir)])
    assert result.exit_code == 0, result.output
    link = json.loads(result.stdout)["links"][1]
    assert link["status"] == "ok" and link["facts"]["os_image_measurements"]["os_image_hash"] == \
        SIMULATED_OS_IMAGE_HASH.hex()
    assert "MRTD and RTMR0-2 match its pinned measurements" in link["summary"]


@pytest.mark.parametrize("register", REGISTERS)
def test_seal_verify_refuses_a_quote_with_another_boot_register(world, platform, tmp_path, register):
    genuine = getattr(SIMULATED_OS_IMAGE.measurement_record(), register)
    receipt = rebooted(world, platform, **{register: flip(genuine)})
    report = verify(world, receipt, os_measurements=[SIMULATED_OS_IMAGE.measurement_record()])
    assert [link.number for link in report.links if not link.holds] == [2]
    # (RTMR0-2 also no longer replay from the log's firmware entries: the receipt's log is the genuine boot's.)
    assert (f"{NAMES[register]} of the quote is {flip(genuine).hex()} but OS image {SIMULATED_OS_IMAGE.name} "
            f"{SIMULATED_OS_IMAGE.version} (os_image_hash {SIMULATED_OS_IMAGE_HASH.hex()}) expects {genuine.hex()}"
            in report.first_failure.reason)
    assert report.link("event-log").facts["os_image_measurements"]["differ"] == [NAMES[register]]
    path = tmp_path / "attestation.json"
    path.write_text(json.dumps(receipt))
    result = runner.invoke(seal_cli, ["verify", str(path), "--allow-simulated", "--state-dir",
                                      str(world.stack.state_dir)])
    assert result.exit_code == 1
    assert "error: link 2 (event-log) is broken:" in result.stderr
    assert f"{NAMES[register]} of the quote is" in result.stderr


def test_seal_verify_without_a_record_says_the_os_was_not_checked(world, platform):
    assert verify(world, rebooted(world, platform), os_measurements=[SIMULATED_OS_IMAGE.measurement_record()]).ok
    report = verify(world, world.receipt)   # no records pinned
    link = report.link("event-log")
    assert report.ok and link.status is LinkStatus.WARNING
    assert link.reason.startswith(f"OS NOT CHECKED: the CVM booted OS image {SIMULATED_OS_IMAGE_HASH.hex()}, and no "
                                  "measurement record is pinned for it")
    # An explicit pin replaces the stack's records (and the receipt never supplies one).
    result = runner.invoke(seal_cli, ["verify", str(world.receipt_path), "--allow-simulated", "--os-measurements",
                                      str(REAL_RECORD), "--state-dir", str(world.stack.state_dir)])
    assert result.exit_code == 0 and "OS NOT CHECKED" in result.stdout and "WARNING" in result.stdout


def test_link_2_alone_compares_the_boot_with_the_pinned_record(world):
    receipt = parse_receipt(world.receipt)
    pins = Pins(now=int(time.time()), allow_simulated=True, simulated_root_der=world.simulated_root_der)
    proof = quote_link.check(receipt, pins).proven
    record = SIMULATED_OS_IMAGE.measurement_record()
    held = event_log_link.check(receipt, proof, dataclasses.replace(pins, os_measurements=(record,)))
    assert held.warnings == () and held.facts["os_image_measurements"]["name"] == SIMULATED_OS_IMAGE.name
    unpinned = event_log_link.check(receipt, proof, pins)
    assert unpinned.warnings[0].startswith("OS NOT CHECKED") and unpinned.proven == held.proven
    other = dataclasses.replace(record, mrtd=flip(record.mrtd), rtmr2=flip(record.rtmr2))
    with pytest.raises(Broken) as broken:
        event_log_link.check(receipt, proof, dataclasses.replace(pins, os_measurements=(other,)))
    assert broken.value.reason.startswith(f"MRTD of the quote is {record.mrtd.hex()} but OS image")
    assert f"; RTMR2 of the quote is {record.rtmr2.hex()}" in broken.value.reason
    assert broken.value.proven == held.proven   # the boot values RTMR3 holds are still proven for later links


# ---- Intel's real sample quote, at its pinned time ------------------------------------------------------------------


def test_the_real_quote_passes_the_gate_once_registered_and_fails_on_any_other_register(tmp_path):
    claims = verify_quote((FIXTURES / "tdx_quote").read_bytes(), collateral=COLLATERAL.read_text(), now=PINNED_NOW)
    record = load_record(REAL_RECORD)
    assert "BUILT FROM THE QUOTE ITSELF" in record.source
    registry = OsImageRegistry(tmp_path / "os-images")
    with pytest.raises(UnknownOsImage):
        registry.gate(record.os_image_hash, claims)
    registry.register(record)
    assert registry.gate(record.os_image_hash, claims) == record
    for register in REGISTERS:
        changed = dataclasses.replace(record, **{register: flip(getattr(record, register))})
        with pytest.raises(OsMeasurementMismatch) as refused:
            OsImageRegistry(records=[changed]).gate(record.os_image_hash, claims)
        assert refused.value.registers == (NAMES[register],)
        assert str(refused.value).startswith(f"{NAMES[register]} of the quote is {getattr(claims, register).hex()}")
