"""An external chain: a second, independently started anvil (chain id 4242, a block every second, its own state
file), standing in for a public testnet or a consortium chain the stack does not run.

Transactions wait for their confirmations; concurrent senders, one sender from several threads, and a nonce used
behind the bindings' back never collide; the KMS reads the chain a confirmation behind its head; and a four-owner
study named by a consortium file runs end to end there, through a restart of that chain's node and a fresh
connection, then resumes from its state folder alone."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from compose.app_compose import compose_hash
from compose.stack_file import StackDescription, StackRefused, read_keystore, write_keystore
from contracts.chain import NONCES, Chain, DstackApp
from cvm.attest.simulated import SimulatedOsImage
from kms_client.client import KmsClient, KmsRefused
from sealing_cli.consortium import CONSORTIUM_FILE, load_consortium
from sealing_cli.devchain import ANVIL_FUNDER_KEY, Anvil
from sealing_cli.stack import LocalStack
from tests.simulated_cvm import SimulatedCvm
from tests.test_consortium import (
    NAMES,
    PASSWORD,
    consortium_text,
    four_owner_recipe,
    keystore_of,
    make_owners,
    run_study,
    seal_cli,
    seal_four_datasets,
)

CHAIN_ID = 4242
runner = CliRunner()


class ExternalNode:
    """An anvil this test starts and restarts by itself, as another party's node would be."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.node = self._start(None)
        self.rpc_url = self.node.rpc_url
        self.faucet = Account.from_key(ANVIL_FUNDER_KEY)   # this chain's own pre-funded account

    def _start(self, port: int | None) -> Anvil:
        return Anvil(chain_id=CHAIN_ID, block_time=1, port=port, state_path=self.folder / "state.json",
                     log_path=self.folder / "anvil.log")

    def restart(self) -> None:
        """Stop the node (it writes its state) and start it again on the same port from that state."""
        self.node.stop()
        self.node = self._start(int(self.rpc_url.rsplit(":", 1)[1]))

    def rpc(self, method: str, *params):
        with Chain(self.rpc_url) as chain:
            reply = chain.w3.provider.make_request(method, list(params))
        assert "error" not in reply, reply
        return reply.get("result")

    def fund(self, *addresses: str, wei: int = 10**18) -> None:
        with Chain(self.rpc_url) as chain:
            threads = [threading.Thread(target=chain.fund, args=(self.faucet, a, wei)) for a in addresses]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(chain.w3.eth.get_balance(a) >= wei for a in addresses)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    node = ExternalNode(tmp_path_factory.mktemp("external-chain"))
    try:
        yield node
    finally:
        node.node.stop()


def test_concurrent_senders_never_collide_and_a_stale_nonce_resyncs(external):
    senders = [Account.create() for _ in range(3)]
    external.fund(*(s.address for s in senders))     # four transactions from one sender, from four threads
    with Chain(external.rpc_url, confirmations=1) as chain:
        kms_signer = Account.create()
        app = DstackApp.deploy(chain, external.faucet, owners=[s.address for s in senders], threshold=2,
                               epsilon_budget=1.0, kms_signer=kms_signer.address)
        hashes = [bytes([n]) * 32 for n in range(1, 7)]
        errors: list[Exception] = []

        def act(fn, *args):
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)

        # one owner proposing three recipes at once, and two owners approving at the same time
        threads = [threading.Thread(target=act, args=(app.propose, h, "", senders[0])) for h in hashes[:3]]
        threads += [threading.Thread(target=act, args=(app.propose, h, "", senders[1])) for h in hashes[3:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all(app.status(h).proposed for h in hashes)

        # Someone else sends from owner 0's account (another process, another wallet): the bindings' local count
        # is now stale; the node refuses the nonce, the count is resynced from the chain, and the approval goes.
        with Chain(external.rpc_url) as other:
            nonce = other.w3.eth.get_transaction_count(senders[0].address, "pending")
            raw = senders[0].sign_transaction({"to": senders[2].address, "value": 1, "gas": 21_000,
                                               "gasPrice": 2 * other.w3.eth.gas_price, "chainId": CHAIN_ID,
                                               "nonce": nonce}).raw_transaction
            other.w3.eth.wait_for_transaction_receipt(other.w3.eth.send_raw_transaction(raw), timeout=30)
        assert NONCES.slot(chain.identity, senders[0].address).nonce == nonce, "the local count is behind"
        receipt = app.approve(hashes[0], senders[0])
        assert receipt["status"] == 1 and app.has_approved(hashes[0], senders[0].address)
        assert NONCES.slot(chain.identity, senders[0].address).nonce == nonce + 2

        # A new connection (a dropped HTTP session) for the same sender continues the same count.
        with Chain(external.rpc_url, confirmations=1) as fresh:
            DstackApp(fresh, app.address).approve(hashes[1], senders[0])
        assert app.has_approved(hashes[1], senders[0].address)


def test_a_transaction_waits_for_its_confirmations_and_reads_lag_behind(external):
    owner = Account.create()
    external.fund(owner.address)
    with Chain(external.rpc_url, confirmations=2) as chain, Chain(external.rpc_url) as at_once:
        app = DstackApp.deploy(chain, external.faucet, owners=[owner.address], threshold=1, epsilon_budget=1.0,
                               kms_signer=Account.create().address)
        h = b"\x07" * 32
        receipt = app.propose(h, "", owner)
        assert chain.w3.eth.block_number >= receipt["blockNumber"] + 2
        assert chain.confirmed_block() <= chain.w3.eth.block_number - 2

        mined = DstackApp(at_once, app.address).approve(h, owner)   # counted as soon as it is mined
        deep = at_once.w3.eth.block_number - mined["blockNumber"] + 3
        assert not app.has_approved(h, owner.address, block=at_once.confirmed_block(deep)), \
            "read `deep` blocks behind the head, the approval is not there yet"
        assert app.has_approved(h, owner.address, block=at_once.confirmed_block(0))
        assert at_once.confirmed_block(0) == "latest"


def _mine_by_hand(external: ExternalNode, on: bool) -> None:
    """Stop interval mining and mine each transaction at once (on), or go back to a block a second (off)."""
    if on:
        external.rpc("evm_setIntervalMining", 0)
        external.rpc("evm_setAutomine", True)
    else:
        external.rpc("evm_setAutomine", False)
        external.rpc("evm_setIntervalMining", 1)


def test_four_owners_run_a_study_on_an_external_chain_through_restarts(external, tmp_path):
    owners = make_owners(tmp_path)
    deployer = Account.create()
    write_keystore(deployer, tmp_path / "deployer.json", "deployer-password")
    external.fund(deployer.address, *(a.address for a in owners.values()))   # owners pay their own gas
    chain_table = (f'[chain]\nrpc_url = "{external.rpc_url}"\nchain_id = {CHAIN_ID}\n'
                   'deployer_keystore = "deployer.json"\nconfirmations = 1\n')
    path = tmp_path / CONSORTIUM_FILE
    path.write_text(consortium_text(owners, chain=chain_table, study="cardio-external"))
    consortium = load_consortium(path)
    deployer_account = read_keystore(tmp_path / "deployer.json", "deployer-password")
    state = tmp_path / "state"
    body = four_owner_recipe(owners, "cardio-external")
    compose_path = tmp_path / "app-compose.json"
    compose_path.write_bytes(body)
    h = compose_hash(body)

    wrong = path.with_name("wrong-chain.toml")
    wrong.write_text(path.read_text().replace(f"chain_id = {CHAIN_ID}", "chain_id = 1"))
    with pytest.raises(StackRefused, match="reports chain id 4242; nothing was deployed"):
        LocalStack(tmp_path / "elsewhere", consortium=load_consortium(wrong), deployer=deployer_account).__enter__()

    with LocalStack(state, consortium=consortium, deployer=deployer_account) as stack:
        d = stack.description
        assert (d.chain, d.chain_id, d.confirmations, d.study) == ("external", CHAIN_ID, 1, "cardio-external")
        assert "anvil" not in d.services, "the stack runs no node of its own"
        kms_argv = Path(f"/proc/{d.services['kms']['pid']}/cmdline").read_bytes().split(b"\0")
        assert kms_argv[kms_argv.index(b"--confirmations") + 1] == b"1"
        with pytest.raises(ValueError, match="MAC mismatch"):   # on a real chain, service keys are not dev keys
            read_keystore(d.kms_signer_keystore, d.dev_keystore_password)

        assert seal_cli(state, "propose", "--compose-hash", h.hex(), "--keystore",
                        str(keystore_of(tmp_path, "Mayo"))).exit_code == 0
        for name in ("Charité", "Karolinska"):
            result = seal_cli(state, "approve", "--compose-hash", h.hex(), "--owner", name)
            assert result.exit_code == 0, result.output

        external.restart()   # mid-study: the other party's node goes down and comes back with its state
        app_id = bytes.fromhex(d.dstack_app[2:])
        with KmsClient(d.services["kms"]["url"]) as kms:
            # The approval that reaches the threshold is mined, but the KMS reads a confirmation behind the
            # head: until one more block is on top, the recipe is not allowed for it.
            _mine_by_hand(external, True)
            try:
                with Chain(external.rpc_url) as at_once:
                    mayo = read_keystore(keystore_of(tmp_path, "Mayo"), PASSWORD)
                    DstackApp(at_once, d.dstack_app).approve(h, mayo)
                    assert DstackApp(at_once, d.dstack_app).status(h).allowed
                with pytest.raises(KmsRefused, match="Compose hash not allowed"):
                    kms.get_app_key(SimulatedCvm(state, app_id, body).attest, app_id=app_id)
                external.rpc("anvil_mine", 1)
                assert kms.get_app_key(SimulatedCvm(state, app_id, body).attest, app_id=app_id).simulated
            finally:
                _mine_by_hand(external, False)
        riken = seal_cli(state, "approve", "--compose-hash", h.hex(), "--keystore",
                         str(keystore_of(tmp_path, "Riken")), "--json")
        assert riken.exit_code == 0, riken.output

        sealed = seal_four_datasets(state, tmp_path, owners, d.dstack_app, h)
        stack.chain.close()   # the stack's own connection is dropped and made again mid-study
        stack.chain = Chain(external.rpc_url, confirmations=1)
        assert DstackApp(stack.chain, d.dstack_app).status(h).approvals == 4
        endpoint = stack.start_cvm(compose_path)
        receipt = tmp_path / "attestation.json"
        process = run_study(StackDescription.load(state), endpoint, sealed, receipt)
        assert process.returncode == 0, process.stderr
        assert json.loads(receipt.read_text())["chain"]["chain_id"] == CHAIN_ID
        verified = seal_cli(state, "verify", str(receipt), "--allow-simulated", "--json")
        assert verified.exit_code == 0, verified.output
        onchain = next(link for link in json.loads(verified.stdout)["links"] if link["name"] == "on-chain")
        assert {a["owner"] for a in onchain["facts"]["approvals"]} == {a.address for a in owners.values()}
        assert DstackApp(stack.chain, d.dstack_app).budget().spent_micro == 1_000_000

        # The operator's own later commands act as the deployer, who owns DstackKms on this chain.
        image = SimulatedOsImage.describe("external-os", "1.0", {n: n.encode() for n in (
            "ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json", "rootfs.img.verity")})
        record_file = tmp_path / "os-record.json"
        record_file.write_bytes(image.measurement_record().to_bytes())
        registered = seal_cli(state, "os", "register", str(record_file), "--json",
                              env={"SEAL_DEPLOYER_PASSWORD": "deployer-password"})
        assert registered.exit_code == 0, registered.output
        assert json.loads(registered.stdout)["newly_allowed"] is True
        stack.chain.close()

    # Later commands and starts find everything in the state folder: the chain, the contracts, the deployer.
    record = json.loads((state / "deployment.json").read_text())
    assert (record["rpc_url"], record["chain_id"], record["deployer"]) == (external.rpc_url, CHAIN_ID,
                                                                           deployer.address)
    assert "deployer-password" not in (state / "deployment.json").read_text()
    stricter = path.with_name("stricter.toml")
    stricter.write_text(path.read_text().replace("threshold = 3", "threshold = 4"))
    with pytest.raises(StackRefused, match=r"threshold 3 \(asked: 4\)"):
        LocalStack(state, consortium=load_consortium(stricter), deployer=deployer_account).__enter__()
    with LocalStack(state, deployer=deployer_account) as again:
        assert again.resumed and again.description.dstack_app == d.dstack_app
        status = seal_cli(state, "status", "--json")
        assert status.exit_code == 0, status.output
        shown = json.loads(status.stdout)
        assert (shown["chain"], shown["confirmations"], shown["study"]) == ("external", 1, "cardio-external")
        assert shown["budget"]["epsilon_spent"] == 1.0
        assert [o.name for o in again.description.owners] == list(NAMES)
