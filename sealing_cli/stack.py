"""The local stack: a dev chain with the consortium's contracts, started and stopped by the project itself.

`LocalStack` is what `seal up`, `seal demo` and the test fixtures share. It writes a stack description
(`stack.json` in the state folder) where later `seal` commands find the chain, the contracts and the dev owners'
keystores, and it stops every child process it started on exit, Ctrl-C or error.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
from eth_account import Account

from compose.backends import boot_simulated_agent
from compose.backends.launcher import ManagedProcess, free_loopback_port
from compose.stack_file import (
    DEV_KEYSTORE_PASSWORD,
    STACK_FILE,
    OwnerEntry,
    StackDescription,
    StackError,
    write_keystore,
)
from contracts.chain import Chain, DstackApp, DstackKms
from cvm.attest.simulated import SIMULATED_OS_IMAGE_HASH, SimulatedTdx
from kms_client import wire
from kms_client.client import KmsClient, KmsError
from sealing_cli.devchain import ANVIL_FUNDER_KEY, Anvil

DEFAULT_OWNER_NAMES = ("EU-West", "EU-North", "US-East", "APAC", "CH")


class LocalStack:
    """Start anvil, deploy DstackKms and one study's DstackApp for dev owners, and describe it all in stack.json."""

    def __init__(self, state_dir: Path, *, owner_names: tuple[str, ...] = DEFAULT_OWNER_NAMES,
                 threshold: int | None = None, epsilon_budget: float = 3.0, with_api: bool = False):
        self.state_dir = state_dir
        self.owner_names = owner_names
        self.threshold = threshold or len(owner_names)
        self.epsilon_budget = epsilon_budget
        self.with_api = with_api
        self._exit = ExitStack()
        # Encrypts the KMS root at rest; lives only in this process, handed to the KMS through its environment.
        self._kms_passphrase = secrets.token_hex(32)
        self.description: StackDescription | None = None
        self.chain: Chain | None = None

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / STACK_FILE).exists():
            raise StackError(f"a stack description already exists in {self.state_dir}: is a stack running? "
                             "(`seal down` stops it; delete the file if it is left over)")
        keys_dir = self.state_dir / "keystores"
        keys_dir.mkdir(exist_ok=True)
        anvil = Anvil(log_path=self.state_dir / "anvil.log")
        self._exit.callback(anvil.stop)
        chain = Chain(anvil.rpc_url)
        self._exit.callback(chain.close)
        funder = Account.from_key(ANVIL_FUNDER_KEY)

        owners, entries = [], []
        for name in self.owner_names:
            account = Account.create()
            path = keys_dir / f"owner-{name}.json"
            path.unlink(missing_ok=True)
            write_keystore(account, path, DEV_KEYSTORE_PASSWORD)
            chain.fund(funder, account.address, 10**20)
            owners.append(account)
            entries.append(OwnerEntry(name=name, address=account.address, keystore=str(path)))

        kms_signer = Account.create()
        kms_path = keys_dir / "kms-signer.json"
        kms_path.unlink(missing_ok=True)
        write_keystore(kms_signer, kms_path, DEV_KEYSTORE_PASSWORD)
        chain.fund(funder, kms_signer.address, 10**20)

        registry = DstackKms.deploy(chain, funder)
        app = DstackApp.deploy(chain, funder, owners=[o.address for o in owners], threshold=self.threshold,
                               epsilon_budget=self.epsilon_budget, kms_signer=kms_signer.address)
        registry.register_app(app.address, funder)

        self.chain = chain
        self.registry = registry
        self._kms_args = (anvil.rpc_url, registry.address, kms_path)
        kms_url, kms_meta = self._start_kms()
        # The operator registers the KMS root auditors pin, and the (simulated) OS image it accepts.
        registry.set_kms_root(bytes.fromhex(kms_meta.k256_pubkey), funder)
        registry.allow_os_image(SIMULATED_OS_IMAGE_HASH, funder)
        self.description = StackDescription(
            rpc_url=anvil.rpc_url, chain_id=chain.chain_id, dstack_kms=registry.address, dstack_app=app.address,
            threshold=self.threshold, epsilon_budget=self.epsilon_budget, owners=entries,
            kms_signer=kms_signer.address, kms_signer_keystore=str(kms_path), supervisor_pid=os.getpid(),
            services={
                "anvil": {"pid": anvil.pid, "rpc_url": anvil.rpc_url},
                "kms": {"pid": self._kms.pid, "url": kms_url, "root_address": kms_meta.root_address,
                        "dev_mode": kms_meta.is_dev, "accepts": "SIMULATED TDX quotes (dev mode)"},
            },
        )
        self.description.save(self.state_dir)
        self._exit.callback((self.state_dir / STACK_FILE).unlink, missing_ok=True)
        if self.with_api:
            self.start_api()   # the API reads the stack description, then adds itself to it

    def _start_kms(self) -> tuple[str, wire.Meta]:
        """Start the KMS in dev mode (it accepts SIMULATED quotes from this stack's simulated TDX root)."""
        rpc_url, registry_address, signer_keystore = self._kms_args
        sim_dir = self.state_dir / "simulated-tdx"
        root_der = sim_dir / "root.der"
        if not root_der.exists():
            root_der.write_bytes(SimulatedTdx.load_or_create(sim_dir).root_der)
        url = f"http://127.0.0.1:{free_loopback_port()}"
        client = KmsClient(url, timeout_s=1.0)
        self._exit.callback(client.close)

        def answers() -> bool:
            try:
                client.meta()
            except KmsError:
                return False
            return True

        self._kms = ManagedProcess(
            "kms",
            [sys.executable, "-m", "kms", "--state-dir", str(self.state_dir / "kms"), "--rpc-url", rpc_url,
             "--dstack-kms", registry_address, "--port", url.rsplit(":", 1)[1], "--signer-keystore",
             str(signer_keystore), "--dev", "--simulated-root", str(root_der)],
            ready=answers, log_path=self.state_dir / "kms.log",
            env={"SEALROOM_KMS_PASSPHRASE": self._kms_passphrase,
                 "SEALROOM_KMS_SIGNER_PASSWORD": DEV_KEYSTORE_PASSWORD},
        )
        self._exit.callback(lambda: self._kms.stop())
        return url, client.meta()

    def restart_kms(self) -> wire.Meta:
        """Stop the KMS and start it again on the same state folder (its root keys survive, encrypted at rest)."""
        self._kms.stop()
        url, meta = self._start_kms()
        self.description.services["kms"].update(pid=self._kms.pid, url=url)
        self.description.save(self.state_dir)
        return meta

    def start_cvm(self, app_compose: Path, *, name: str = "cvm") -> str:
        """Boot a SIMULATED CVM for one app-compose.json: its guest agent measures the recipe, obtains the app
        key from the KMS by attestation, and serves dstack's agent API on a Unix socket (the endpoint returned;
        point dstack-sdk at it with DSTACK_SIMULATOR_ENDPOINT)."""
        d = self.description
        socket_path = self.state_dir / f"{name}.sock"
        process = boot_simulated_agent(app_compose, app_id=d.dstack_app, kms_url=d.services["kms"]["url"],
                                       socket_path=socket_path, simulated_tdx_dir=self.state_dir / "simulated-tdx",
                                       log_path=self.state_dir / f"{name}.log", name=name)
        self._exit.callback(process.stop)
        d.services[name] = {"pid": process.pid, "endpoint": str(socket_path), "simulated": True,
                            "compose_hash": hashlib.sha256(app_compose.read_bytes()).hexdigest()}
        d.save(self.state_dir)
        return str(socket_path)

    def start_api(self) -> str:
        """Start the analysts' REST API (`python -m compose.api`) with its own funded proposer account; return its URL.

        Its state (analysts.json, submitted composes, runs) lives in `<state_dir>/api`; issue tokens there with
        `compose.auth.issue_token`."""
        d = self.description
        proposer = Account.create()
        keystore = self.state_dir / "keystores" / "api-proposer.json"
        keystore.unlink(missing_ok=True)
        write_keystore(proposer, keystore, DEV_KEYSTORE_PASSWORD)
        self.chain.fund(Account.from_key(ANVIL_FUNDER_KEY), proposer.address, 10**20)
        url = f"http://127.0.0.1:{free_loopback_port()}"
        api_dir = self.state_dir / "api"

        def answers() -> bool:
            try:
                return httpx.get(f"{url}/openapi.json", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        process = ManagedProcess(
            "api",
            [sys.executable, "-m", "compose.api", "--stack-state-dir", str(self.state_dir), "--state-dir",
             str(api_dir), "--port", url.rsplit(":", 1)[1], "--proposer-keystore", str(keystore)],
            ready=answers, log_path=self.state_dir / "api.log",
            env={"SEALROOM_API_PROPOSER_PASSWORD": DEV_KEYSTORE_PASSWORD},
        )
        self._exit.callback(process.stop)
        d.services["api"] = {"pid": process.pid, "url": url, "state_dir": str(api_dir),
                             "proposer": proposer.address}
        d.save(self.state_dir)
        return url

    def stop(self) -> None:
        self._exit.close()
