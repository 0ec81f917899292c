"""The local stack: a dev chain with the consortium's contracts, started and stopped by the project itself.

`LocalStack` is what `seal up`, `seal demo` and the test fixtures share. It writes a stack description
(`stack.json` in the state folder) where later `seal` commands find the chain, the contracts and the dev owners'
keystores, and it stops every child process it started on exit, Ctrl-C or error.

A state folder is one stack, and it survives restarts. The first start deploys the contracts and records them in
``deployment.json``; anvil keeps the chain in ``chain/anvil-state.json``; the KMS root is sealed in
``kms/root.sealed`` under a passphrase that comes from ``$SEALROOM_KMS_PASSPHRASE`` or, without it, from
``kms.passphrase`` (0600), generated once; the analysts' API keeps its tokens and composes in ``api/``. A later start
in the same folder loads the chain, checks that the recorded contracts are there, and deploys nothing: the same
contracts, owners, approvals, budget, KMS root and analyst tokens.

Only one stack runs in a folder at a time (an advisory lock, ``stack.lock``, held while it runs). A ``stack.json``
left by a crash — its supervisor process is gone — is removed at the next start, after stopping any of its
services that still run on this folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
from eth_account import Account
from eth_keys import keys as eth_keys

from compose.backends import boot_simulated_agent
from compose.backends.launcher import (
    ManagedProcess,
    ServiceStartError,
    free_loopback_port,
)
from compose.stack_file import (
    DEPLOYMENT_FILE,
    DEV_KEYSTORE_PASSWORD,
    STACK_FILE,
    OwnerEntry,
    StackDeployment,
    StackDescription,
    StackError,
    StackRefused,
    process_alive,
    read_keystore,
    write_keystore,
)
from contracts.chain import Chain, DstackApp, DstackKms
from cvm.attest.simulated import SIMULATED_OS_IMAGE, SimulatedTdx
from kms.root_store import ROOT_STORE_FILENAME
from kms_client import wire
from kms_client.client import KmsClient, KmsError
from sealing_cli.devchain import ANVIL_FUNDER_KEY, Anvil
from sealing_cli.os_images import register_os_image

DEFAULT_OWNER_NAMES = ("EU-West", "EU-North", "US-East", "APAC", "CH")
DEFAULT_EPSILON_BUDGET = 3.0
KMS_PASSPHRASE_ENV = "SEALROOM_KMS_PASSPHRASE"
KMS_PASSPHRASE_FILE = "kms.passphrase"
CHAIN_STATE_FILE = Path("chain") / "anvil-state.json"
LOCK_FILE = "stack.lock"
_FUNDS = 10**20
_KEYSTORES = "keystores"


def _note_to_stderr(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def kms_passphrase(state_dir: Path) -> tuple[str, str]:
    """The passphrase that seals the KMS root in ``state_dir``, and where it came from.

    ``$SEALROOM_KMS_PASSPHRASE`` when the operator sets it; else the folder's ``kms.passphrase`` (0600); else, only
    while no root store exists, a new one, generated once and kept in that file. A root store without a passphrase is
    refused (:class:`StackRefused`), never replaced: whoever holds its passphrase must provide it."""
    given = os.environ.get(KMS_PASSPHRASE_ENV)
    if given:
        return given, f"${KMS_PASSPHRASE_ENV}"
    path = state_dir / KMS_PASSPHRASE_FILE
    store = state_dir / "kms" / ROOT_STORE_FILENAME
    try:
        return _read_passphrase_file(path), str(path)
    except FileNotFoundError:
        pass
    if store.exists():
        raise StackRefused(
            f"the KMS root store {store} exists, but there is no passphrase for it: set {KMS_PASSPHRASE_ENV} to the "
            f"passphrase it was sealed with (the store is left untouched; a store from a `seal up` older than "
            f"restartable stacks was sealed with a throwaway passphrase and cannot be opened: use another --state-dir)")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start made it just now
        return _read_passphrase_file(path), str(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return _read_passphrase_file(path), str(path)


def _read_passphrase_file(path: Path) -> str:
    mode = path.stat().st_mode  # FileNotFoundError goes to the caller
    if mode & 0o077:
        raise StackRefused(f"{path} is readable by others (mode {mode & 0o777:o}); it holds the KMS root "
                           f"passphrase: `chmod 600 {path}`")
    passphrase = path.read_text().strip()
    if not passphrase:
        raise StackRefused(f"{path} is empty; it should hold the KMS root passphrase")
    return passphrase


def _port_if_free(url: str | None) -> int | None:
    """The port of ``url`` when nothing listens on it now (a restarted service keeps its URL), else None."""
    if not url:
        return None
    try:
        port = int(url.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


def clear_stale_description(state_dir: Path, notify: Callable[[str], None] = _note_to_stderr) -> None:
    """A stack.json whose supervisor is alive means another stack runs in ``state_dir`` (:class:`StackRefused`);
    one whose supervisor is gone was left by a crash: stop the services it lists that still run on this folder
    (anvil saves its chain as it stops), remove it, and say so through ``notify``."""
    path = state_dir / STACK_FILE
    if not path.exists():
        return
    try:
        old = StackDescription.load(state_dir)
    except StackError as exc:
        raise StackRefused(f"{exc}; it is left as it is: remove it yourself if no stack runs in {state_dir}") from None
    if process_alive(old.supervisor_pid):
        raise StackRefused(f"another stack is running in {state_dir} (its supervisor is process "
                           f"{old.supervisor_pid}); stop it first (`seal down --state-dir {state_dir}`)")
    stopped = [name for name, service in old.services.items()
               if isinstance(service, dict) and _stop_leftover(state_dir, service.get("pid"))]
    path.unlink(missing_ok=True)
    notify(f"removed a stale {STACK_FILE} left by a stack that did not stop cleanly (its supervisor, process "
           f"{old.supervisor_pid}, is gone)" + (f"; stopped its leftover {', '.join(stopped)}" if stopped else ""))


def _stop_leftover(state_dir: Path, pid: object) -> bool:
    """Stop a crashed stack's service, only if it is still running on this very folder (its command line names
    it): a recycled pid belongs to someone else and is left alone."""
    if not isinstance(pid, int) or not process_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    here = str(state_dir.resolve()).encode()
    if not any(arg == here or arg.startswith(here + b"/") for arg in argv):
        return False
    try:
        # Our services lead their own process group (ManagedProcess starts a new session).
        kill = os.killpg if os.getpgid(pid) == pid else os.kill
        kill(pid, signal.SIGTERM)   # anvil writes its state file as it exits
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


class LocalStack:
    """Start anvil, deploy DstackKms and one study's DstackApp for dev owners (or, in a folder that already has
    them, load the chain and reuse them), start the KMS, and describe it all in stack.json.

    ``owner_names``, ``threshold`` and ``epsilon_budget`` are fixed by the first deployment. Left out (None), a
    restart takes them from ``deployment.json``; given and different, the start is refused."""

    def __init__(self, state_dir: Path, *, owner_names: tuple[str, ...] | None = None,
                 threshold: int | None = None, epsilon_budget: float | None = None, with_api: bool = False,
                 notify: Callable[[str], None] | None = None):
        self.state_dir = Path(state_dir).resolve()
        self._asked = (tuple(owner_names) if owner_names is not None else None, threshold, epsilon_budget)
        self.owner_names = self._asked[0] or DEFAULT_OWNER_NAMES
        self.threshold = threshold or len(self.owner_names)
        self.epsilon_budget = DEFAULT_EPSILON_BUDGET if epsilon_budget is None else epsilon_budget
        self.with_api = with_api
        self.notify = notify or _note_to_stderr
        self._exit = ExitStack()
        self.description: StackDescription | None = None
        self.deployment: StackDeployment | None = None
        self.chain: Chain | None = None
        self.resumed = False     # True when this start reopened the folder's existing deployment

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- starting --------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._clear_stale_description()
        # Registered first, so it runs last: stack.json goes only once every service has stopped.
        self._exit.callback((self.state_dir / STACK_FILE).unlink, missing_ok=True)
        deployment = StackDeployment.load(self.state_dir)
        if deployment is not None:
            self._adopt(deployment)
        else:
            self._check_fresh_folder()
        self._kms_passphrase, self._kms_passphrase_source = kms_passphrase(self.state_dir)
        last = deployment.last_urls if deployment else {}

        anvil = Anvil(log_path=self.state_dir / "anvil.log", state_path=self.state_dir / CHAIN_STATE_FILE,
                      port=_port_if_free(last.get("anvil")))
        self._exit.callback(anvil.stop)
        chain = Chain(anvil.rpc_url)
        self._exit.callback(chain.close)
        self.chain = chain
        funder = Account.from_key(ANVIL_FUNDER_KEY)
        if deployment is not None:
            self._check_chain(deployment)
            self.resumed = True
        else:
            deployment = self._deploy(funder)
        self.deployment = deployment

        registry = DstackKms(chain, deployment.dstack_kms)
        self.registry = registry
        self._kms_args = (anvil.rpc_url, registry.address, self.state_dir / deployment.kms_signer_keystore)
        kms_url, kms_meta = self._start_kms(_port_if_free(last.get("kms")))
        self._publish(registry, kms_meta, funder)
        deployment.last_urls.update(anvil=anvil.rpc_url, kms=kms_url)
        deployment.save(self.state_dir)
        entries = [OwnerEntry(name=o.name, address=o.address, keystore=str(self.state_dir / o.keystore))
                   for o in deployment.owners]
        self.description = StackDescription(
            rpc_url=anvil.rpc_url, chain_id=chain.chain_id, dstack_kms=registry.address,
            dstack_app=deployment.dstack_app, threshold=deployment.threshold,
            epsilon_budget=deployment.epsilon_budget, owners=entries, kms_signer=deployment.kms_signer,
            kms_signer_keystore=str(self.state_dir / deployment.kms_signer_keystore), supervisor_pid=os.getpid(),
            services={
                "anvil": {"pid": anvil.pid, "rpc_url": anvil.rpc_url,
                          "state": str(self.state_dir / CHAIN_STATE_FILE)},
                "kms": {"pid": self._kms.pid, "url": kms_url, "root_address": kms_meta.root_address,
                        "dev_mode": kms_meta.is_dev, "accepts": "SIMULATED TDX quotes (dev mode)"},
            },
        )
        self.description.save(self.state_dir)
        if self.with_api:
            self.start_api()   # the API reads the stack description, then adds itself to it

    def _lock(self) -> None:
        """Hold ``stack.lock`` while this stack runs: a second start in the folder is refused, even mid-start."""
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StackRefused(f"another stack is running (or starting) in {self.state_dir}; stop it first "
                               f"(`seal down --state-dir {self.state_dir}`), or use another --state-dir") from None
        self._exit.callback(os.close, fd)

    def _clear_stale_description(self) -> None:
        clear_stale_description(self.state_dir, self.notify)

    def _adopt(self, deployment: StackDeployment) -> None:
        """Take owners, threshold and budget from the folder's deployment; refuse flags that contradict it."""
        names, threshold, budget = self._asked
        saved = tuple(o.name for o in deployment.owners)
        conflicts = []
        if names is not None and names != saved:
            conflicts.append(f"owners {', '.join(saved)} (asked: {', '.join(names)})")
        if threshold is not None and threshold != deployment.threshold:
            conflicts.append(f"threshold {deployment.threshold} (asked: {threshold})")
        if budget is not None and budget != deployment.epsilon_budget:
            conflicts.append(f"ε budget {deployment.epsilon_budget:g} (asked: {budget:g})")
        if conflicts:
            raise StackRefused(f"the stack in {self.state_dir} was deployed with {'; '.join(conflicts)}, and its "
                               "contracts fix them: start it again without those options, or use another "
                               "--state-dir for a new study")
        for relative in [o.keystore for o in deployment.owners] + [deployment.kms_signer_keystore]:
            if not (self.state_dir / relative).is_file():
                raise StackRefused(f"{self.state_dir / relative} is missing: the stack recorded in "
                                   f"{self.state_dir / DEPLOYMENT_FILE} cannot act without it")
        self.owner_names, self.threshold, self.epsilon_budget = saved, deployment.threshold, deployment.epsilon_budget

    def _check_fresh_folder(self) -> None:
        """A first deployment creates its keystores; it never replaces files that are already there."""
        keys = self.state_dir / _KEYSTORES
        planned = [keys / f"owner-{name}.json" for name in self.owner_names]
        planned += [keys / "kms-signer.json", keys / "api-proposer.json"]
        present = [str(p) for p in planned if p.exists() or p.is_symlink()]
        if present:
            raise StackRefused(f"{self.state_dir} has no {DEPLOYMENT_FILE} but already holds {', '.join(present)}: "
                               "they are not this stack's and are left as they are; use another --state-dir")

    def _check_chain(self, deployment: StackDeployment) -> None:
        """The loaded chain must hold the contracts the folder deployed, with its owners and KMS signer."""
        chain = self.chain
        state = self.state_dir / CHAIN_STATE_FILE
        if chain.chain_id != deployment.chain_id:
            raise StackError(f"the chain in {state} has chain id {chain.chain_id}, "
                             f"the deployment {deployment.chain_id}")
        for label, address in (("DstackKms", deployment.dstack_kms), ("DstackApp", deployment.dstack_app)):
            if not chain.w3.eth.get_code(address):
                raise StackError(
                    f"the chain loaded from {state} has no {label} at {address}, which {DEPLOYMENT_FILE} records: the "
                    "chain state was lost (a crash before it was first saved?) or replaced. The stack cannot resume "
                    "without its contracts; start a new one in another --state-dir")
        app = DstackApp(chain, deployment.dstack_app)
        recorded = [o.address.lower() for o in deployment.owners]
        if [a.lower() for a in app.owners()] != recorded or app.kms_signer().lower() != deployment.kms_signer.lower():
            raise StackError(f"the DstackApp at {deployment.dstack_app} does not have the owners and KMS signer that "
                             f"{DEPLOYMENT_FILE} records; the stack cannot resume")

    def _deploy(self, funder) -> StackDeployment:
        """First start: fund fresh dev accounts, deploy the contracts, then write the keystores and the record."""
        chain = self.chain
        owners = [(name, Account.create()) for name in self.owner_names]
        kms_signer = Account.create()
        for _, account in (*owners, ("kms-signer", kms_signer)):
            chain.fund(funder, account.address, _FUNDS)
        registry = DstackKms.deploy(chain, funder)
        app = DstackApp.deploy(chain, funder, owners=[a.address for _, a in owners], threshold=self.threshold,
                               epsilon_budget=self.epsilon_budget, kms_signer=kms_signer.address)
        registry.register_app(app.address, funder)
        # The keystores and the record that names them are written together, right after the deployment.
        keys = self.state_dir / _KEYSTORES
        keys.mkdir(exist_ok=True)
        entries = []
        for name, account in owners:
            relative = f"{_KEYSTORES}/owner-{name}.json"
            write_keystore(account, self.state_dir / relative, DEV_KEYSTORE_PASSWORD)
            entries.append(OwnerEntry(name=name, address=account.address, keystore=relative))
        signer_keystore = f"{_KEYSTORES}/kms-signer.json"
        write_keystore(kms_signer, self.state_dir / signer_keystore, DEV_KEYSTORE_PASSWORD)
        deployment = StackDeployment(
            chain_id=chain.chain_id, dstack_kms=registry.address, dstack_app=app.address, threshold=self.threshold,
            epsilon_budget=self.epsilon_budget, owners=entries, kms_signer=kms_signer.address,
            kms_signer_keystore=signer_keystore)
        deployment.save(self.state_dir)
        return deployment

    def _publish(self, registry: DstackKms, meta: wire.Meta, funder) -> None:
        """The operator registers the KMS root auditors pin and the (simulated) OS image it accepts — once: a
        restarted stack finds them on-chain, and a KMS root that differs from the published one is refused."""
        root = bytes.fromhex(meta.k256_pubkey)
        published = registry.kms_root_pubkey()
        if not published:
            registry.set_kms_root(root, funder)
        elif published != root:
            theirs = eth_keys.PublicKey.from_compressed_bytes(published).to_checksum_address()
            raise StackError(f"DstackKms {registry.address} publishes the KMS root {theirs}, but the KMS opened the "
                             f"root {meta.root_address} from {self.state_dir / 'kms' / ROOT_STORE_FILENAME}; "
                             "the root store was replaced, and the stack cannot resume with it")
        # The simulated OS image its CVMs boot: its measurement record with the KMS, its hash on DstackKms.
        register_os_image(self.state_dir, registry, SIMULATED_OS_IMAGE.measurement_record(), funder)

    def _start_kms(self, port: int | None = None) -> tuple[str, wire.Meta]:
        """Start the KMS in dev mode (it accepts SIMULATED quotes from this stack's simulated TDX root)."""
        rpc_url, registry_address, signer_keystore = self._kms_args
        sim_dir = self.state_dir / "simulated-tdx"
        root_der = sim_dir / "root.der"
        if not root_der.exists():
            root_der.write_bytes(SimulatedTdx.load_or_create(sim_dir).root_der)
        url = f"http://127.0.0.1:{port or free_loopback_port()}"
        client = KmsClient(url, timeout_s=1.0)
        self._exit.callback(client.close)

        def answers() -> bool:
            try:
                client.meta()
            except KmsError:
                return False
            return True

        store = self.state_dir / "kms" / ROOT_STORE_FILENAME
        existed = store.exists()
        try:
            self._kms = ManagedProcess(
                "kms",
                [sys.executable, "-m", "kms", "--state-dir", str(self.state_dir / "kms"), "--rpc-url", rpc_url,
                 "--dstack-kms", registry_address, "--port", url.rsplit(":", 1)[1], "--signer-keystore",
                 str(signer_keystore), "--dev", "--simulated-root", str(root_der)],
                ready=answers, log_path=self.state_dir / "kms.log",
                env={KMS_PASSPHRASE_ENV: self._kms_passphrase, "SEALROOM_KMS_SIGNER_PASSWORD": DEV_KEYSTORE_PASSWORD},
            )
        except ServiceStartError as exc:
            if existed and "passphrase" in str(exc):
                raise StackRefused(f"the KMS root store {store} does not open with the passphrase from "
                                   f"{self._kms_passphrase_source} ({exc}); set {KMS_PASSPHRASE_ENV} to the "
                                   "passphrase it was sealed with. The store is left untouched") from None
            raise
        self._exit.callback(lambda: self._kms.stop())
        return url, client.meta()

    def restart_kms(self) -> wire.Meta:
        """Stop the KMS and start it again on the same state folder (its root keys survive, encrypted at rest)."""
        self._kms.stop()
        url, meta = self._start_kms(_port_if_free(self.description.services["kms"]["url"]))
        self.description.services["kms"].update(pid=self._kms.pid, url=url)
        self.description.save(self.state_dir)
        return meta

    # --- services on top ---------------------------------------------------------------------------------------------

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

        Its state (analysts.json, submitted composes, runs) lives in `<state_dir>/api` and survives restarts, as
        do the proposer account and, when its port is free, the API's URL; issue tokens there with
        `compose.auth.issue_token`."""
        d, deployment = self.description, self.deployment
        funder = Account.from_key(ANVIL_FUNDER_KEY)
        if deployment.api_proposer_keystore:
            keystore = self.state_dir / deployment.api_proposer_keystore
            proposer = read_keystore(keystore, DEV_KEYSTORE_PASSWORD)
            if self.chain.w3.eth.get_balance(proposer.address) < _FUNDS // 100:
                self.chain.fund(funder, proposer.address, _FUNDS)
        else:
            relative = f"{_KEYSTORES}/api-proposer.json"
            keystore = self.state_dir / relative
            proposer = Account.create()
            try:
                write_keystore(proposer, keystore, DEV_KEYSTORE_PASSWORD)
            except FileExistsError:
                raise StackRefused(f"{keystore} exists but {DEPLOYMENT_FILE} does not name it: it is not this "
                                   "stack's and is left as it is") from None
            self.chain.fund(funder, proposer.address, _FUNDS)
            deployment.api_proposer, deployment.api_proposer_keystore = proposer.address, relative
            deployment.save(self.state_dir)
        url = f"http://127.0.0.1:{_port_if_free(deployment.last_urls.get('api')) or free_loopback_port()}"
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
        deployment.last_urls["api"] = url
        deployment.save(self.state_dir)
        return url

    def stop(self) -> None:
        self._exit.close()
