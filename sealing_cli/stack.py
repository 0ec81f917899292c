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
from eth_account.signers.local import LocalAccount
from eth_keys import keys as eth_keys

from compose.backends import boot_simulated_agent
from compose.backends.launcher import (
    ManagedProcess,
    ServiceStartError,
    Supervisor,
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
from sealing_cli.consortium import Consortium
from sealing_cli.devchain import ANVIL_FUNDER_KEY, Anvil
from sealing_cli.os_images import register_os_image
from sealing_cli.study_backend import StudyBackend, prepare_study_backend

DEFAULT_OWNER_NAMES = ("EU-West", "EU-North", "US-East", "APAC", "CH")
DEFAULT_EPSILON_BUDGET = 3.0
KMS_PASSPHRASE_ENV = "SEALROOM_KMS_PASSPHRASE"
KMS_PASSPHRASE_FILE = "kms.passphrase"
CHAIN_STATE_FILE = Path("chain") / "anvil-state.json"
LOCK_FILE = "stack.lock"
_FUNDS = 10**20
# On an external chain the deployer pays: it gives the KMS signer and the API proposer this much for their gas
# (topped up at a start when they hold less than a tenth of it), and a transaction may take this long to confirm.
EXTERNAL_SERVICE_FUNDS = 5 * 10**16
EXTERNAL_TX_TIMEOUT_S = 300.0
DEFAULT_CHAIN_ID = 31337
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
    restart takes them from ``deployment.json``; given and different, the start is refused.

    ``consortium`` (a checked consortium file, `sealing_cli.consortium`) gives them instead, with the owners' own
    addresses (no dev keys are made for them) and the chain: the embedded anvil, or an external JSON-RPC node, where
    ``deployer`` pays for the deployment and funds the KMS signer and the API proposer, and transactions wait for
    the file's confirmations. A restart of a folder deployed on an external chain needs ``deployer`` again.

    ``backend`` is where the API runs study CVMs (`sealing_cli.study_backend`): ``"container"`` (the default; the
    stack starts the container engine and builds the study image when its API starts, and refuses loudly without
    an engine) or the ``"process"`` fallback. ``image_digests``: the study images composes may name (default: the
    one built in ``STATE/study-image``)."""

    def __init__(self, state_dir: Path, *, owner_names: tuple[str, ...] | None = None,
                 threshold: int | None = None, epsilon_budget: float | None = None, with_api: bool = False,
                 notify: Callable[[str], None] | None = None, consortium: Consortium | None = None,
                 deployer: LocalAccount | None = None, backend: str = "container",
                 image_digests: tuple[str, ...] | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.backend, self.image_digests = backend, image_digests
        self.study_backend: StudyBackend | None = None     # once the API has started
        self.consortium, self.deployer = consortium, deployer
        if consortium is not None:
            owner_names = tuple(o.name for o in consortium.owners)
            threshold, epsilon_budget = consortium.threshold, consortium.epsilon_budget
        self._asked = (tuple(owner_names) if owner_names is not None else None, threshold, epsilon_budget)
        self.owner_names = self._asked[0] or DEFAULT_OWNER_NAMES
        self.threshold = threshold or len(self.owner_names)
        self.epsilon_budget = DEFAULT_EPSILON_BUDGET if epsilon_budget is None else epsilon_budget
        self.with_api = with_api
        self.notify = notify or _note_to_stderr
        self._exit = ExitStack()
        # `supervise()` starts a service that dies again (seal up runs it); it records restarts in stack.json.
        self._supervisor = Supervisor(report=self._service_changed, notify=self.notify)
        self.description: StackDescription | None = None
        self.deployment: StackDeployment | None = None
        self.chain: Chain | None = None
        self.resumed = False     # True when this start reopened the folder's existing deployment
        self.rpc_url = ""
        self.external = False    # True on an external chain (a consortium file's rpc_url): no anvil runs here
        self._service_password = DEV_KEYSTORE_PASSWORD

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

        external_url = self._external_url(deployment)
        services: dict = {}
        if external_url is None:
            chain_id = deployment.chain_id if deployment else (
                self.consortium and self.consortium.chain.chain_id) or DEFAULT_CHAIN_ID

            def start_anvil(port: int | None) -> Anvil:   # a restart reloads the same state file, on the same port
                return Anvil(log_path=self.state_dir / "anvil.log", state_path=self.state_dir / CHAIN_STATE_FILE,
                             port=port, chain_id=chain_id)

            anvil = start_anvil(_port_if_free(last.get("anvil")))
            anvil_port = int(anvil.rpc_url.rsplit(":", 1)[1])
            self._supervisor.watch("anvil", anvil, lambda: start_anvil(anvil_port),
                                   log_path=self.state_dir / "anvil.log")
            self._exit.callback(self._supervisor.stop, "anvil")
            chain = Chain(anvil.rpc_url)
            funder = Account.from_key(ANVIL_FUNDER_KEY)
            self.rpc_url = anvil.rpc_url
            services["anvil"] = {"pid": anvil.pid, "rpc_url": anvil.rpc_url,
                                 "state": str(self.state_dir / CHAIN_STATE_FILE)}
        else:
            chain, funder = self._connect_external(external_url, deployment)
        self._exit.callback(chain.close)
        self.chain = chain
        if deployment is not None:
            self._check_chain(deployment)
            self.resumed = True
        else:
            deployment = self._deploy(funder)
        self.deployment = deployment

        registry = DstackKms(chain, deployment.dstack_kms)
        self.registry = registry
        self._funder = funder
        self._service_password = (self._kms_passphrase if deployment.service_keystores == "kms-passphrase"
                                  else DEV_KEYSTORE_PASSWORD)
        if self.external:
            deployment.rpc_url = self.rpc_url   # a consortium file may name a new URL for the same chain
            self._top_up(deployment.kms_signer)
        self._kms_args = (self.rpc_url, registry.address, self.state_dir / deployment.kms_signer_keystore)
        kms_url, kms_meta = self._start_kms(_port_if_free(last.get("kms")))
        self._publish(registry, kms_meta, funder)
        deployment.last_urls.update(kms=kms_url, **({} if self.external else {"anvil": self.rpc_url}))
        deployment.save(self.state_dir)
        entries = [OwnerEntry(name=o.name, address=o.address, kind=o.kind,
                              keystore=str(self.state_dir / o.keystore) if o.keystore else "")
                   for o in deployment.owners]
        self.description = StackDescription(
            rpc_url=self.rpc_url, chain_id=chain.chain_id, dstack_kms=registry.address,
            dstack_app=deployment.dstack_app, threshold=deployment.threshold,
            epsilon_budget=deployment.epsilon_budget, owners=entries, kms_signer=deployment.kms_signer,
            kms_signer_keystore=str(self.state_dir / deployment.kms_signer_keystore), supervisor_pid=os.getpid(),
            study=deployment.study, chain="external" if self.external else "embedded",
            confirmations=chain.confirmations,
            services={
                **services,
                "kms": {"pid": self._kms.pid, "url": kms_url, "root_address": kms_meta.root_address,
                        "dev_mode": kms_meta.is_dev, "accepts": "SIMULATED TDX quotes (dev mode)"},
            },
        )
        self.description.save(self.state_dir)
        if self.with_api:
            self.start_api()   # the API reads the stack description, then adds itself to it
            self.start_console()   # the owners' approval console (issue 14), beside the API

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
        conflicts += self._consortium_conflicts(deployment)
        if conflicts:
            raise StackRefused(f"the stack in {self.state_dir} was deployed with {'; '.join(conflicts)}, and its "
                               "contracts fix them: start it again without those options, or use another "
                               "--state-dir for a new study")
        for relative in [o.keystore for o in deployment.owners if o.kind == "dev"] + [deployment.kms_signer_keystore]:
            if not (self.state_dir / relative).is_file():
                raise StackRefused(f"{self.state_dir / relative} is missing: the stack recorded in "
                                   f"{self.state_dir / DEPLOYMENT_FILE} cannot act without it")
        self.owner_names, self.threshold, self.epsilon_budget = saved, deployment.threshold, deployment.epsilon_budget

    def _check_fresh_folder(self) -> None:
        """A first deployment creates its keystores; it never replaces files that are already there."""
        keys = self.state_dir / _KEYSTORES
        planned = [keys / f"owner-{name}.json" for name in self.owner_names] if self.consortium is None else []
        planned += [keys / "kms-signer.json", keys / "api-proposer.json"]
        present = [str(p) for p in planned if p.exists() or p.is_symlink()]
        if present:
            raise StackRefused(f"{self.state_dir} has no {DEPLOYMENT_FILE} but already holds {', '.join(present)}: "
                               "they are not this stack's and are left as they are; use another --state-dir")

    def _check_chain(self, deployment: StackDeployment) -> None:
        """The loaded chain must hold the contracts the folder deployed, with its owners and KMS signer."""
        chain = self.chain
        state = self.rpc_url if self.external else self.state_dir / CHAIN_STATE_FILE
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
        """First start: fund fresh dev accounts (or a consortium file's owners, on the embedded chain), deploy the
        contracts, then write the keystores and the record."""
        chain = self.chain
        if self.consortium is None:
            owners = [(name, Account.create()) for name in self.owner_names]
            addresses = [a.address for _, a in owners]
        else:   # the owners' own accounts: their keys are theirs, never made or kept here
            owners, addresses = [], [o.address for o in self.consortium.owners]
        kms_signer = Account.create()
        if self.external:   # owners pay their own gas; the deployer funds the KMS signer's spends
            chain.fund(funder, kms_signer.address, EXTERNAL_SERVICE_FUNDS)
        else:
            for address in (*addresses, kms_signer.address):
                chain.fund(funder, address, _FUNDS)
        registry = DstackKms.deploy(chain, funder)
        app = DstackApp.deploy(chain, funder, owners=addresses, threshold=self.threshold,
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
        for owner in self.consortium.owners if self.consortium else ():
            entries.append(OwnerEntry(name=owner.name, address=owner.address, keystore=str(owner.keystore or ""),
                                      kind="keystore" if owner.keystore else "address"))
        service_keystores = "kms-passphrase" if self.external else "dev"
        signer_keystore = f"{_KEYSTORES}/kms-signer.json"
        write_keystore(kms_signer, self.state_dir / signer_keystore,
                       self._kms_passphrase if self.external else DEV_KEYSTORE_PASSWORD)
        settings = self.consortium.chain if self.consortium else None
        deployment = StackDeployment(
            chain_id=chain.chain_id, dstack_kms=registry.address, dstack_app=app.address, threshold=self.threshold,
            epsilon_budget=self.epsilon_budget, owners=entries, kms_signer=kms_signer.address,
            kms_signer_keystore=signer_keystore, study=self.consortium.study if self.consortium else "",
            rpc_url=self.rpc_url if self.external else "", confirmations=chain.confirmations,
            deployer=funder.address if self.external else "",
            deployer_keystore=str(settings.deployer_keystore) if settings and settings.deployer_keystore else "",
            service_keystores=service_keystores)
        deployment.save(self.state_dir)
        return deployment

    # --- a consortium file, an external chain -------------------------------------------------------------------

    def _consortium_conflicts(self, deployment: StackDeployment) -> list[str]:
        """What a consortium file given again says that the folder's deployment does not (names, threshold and
        budget are compared with the flags')."""
        if self.consortium is None:
            return []
        conflicts = []
        given = [o.address for o in self.consortium.owners]
        if [a.lower() for a in given] != [o.address.lower() for o in deployment.owners]:
            conflicts.append(f"owner addresses {', '.join(o.address for o in deployment.owners)} (asked: "
                             f"{', '.join(given)})")
        settings = self.consortium.chain
        if settings.embedded != (not deployment.rpc_url):
            conflicts.append("the embedded chain" if not deployment.rpc_url else f"the chain at {deployment.rpc_url}")
        if settings.chain_id is not None and settings.chain_id != deployment.chain_id:
            conflicts.append(f"chain id {deployment.chain_id} (asked: {settings.chain_id})")
        if deployment.rpc_url and settings.confirmations != deployment.confirmations:
            conflicts.append(f"{deployment.confirmations} confirmations (asked: {settings.confirmations})")
        return conflicts

    def _external_url(self, deployment: StackDeployment | None) -> str | None:
        """The external chain's JSON-RPC URL (the consortium file's, else the folder's deployment's), or None for
        the embedded anvil."""
        if self.consortium is not None:
            return self.consortium.chain.rpc_url
        return deployment.rpc_url if deployment is not None and deployment.rpc_url else None

    def _connect_external(self, url: str, deployment: StackDeployment | None) -> tuple[Chain, LocalAccount]:
        """Connect to the external chain; check its chain id and the deployer who pays for this stack."""
        confirmations = self.consortium.chain.confirmations if self.consortium else deployment.confirmations
        expected = deployment.deployer if deployment is not None else ""
        if self.deployer is None:
            raise StackRefused(f"the stack's chain is external ({url}): starting it needs the deployer's key "
                               "(the deployer_keystore of the consortium file)")
        if expected and self.deployer.address.lower() != expected.lower():
            raise StackRefused(f"the deployer key is {self.deployer.address}, but this folder's contracts were "
                               f"deployed by {expected}, which owns DstackKms; use that account's keystore")
        chain = Chain(url, confirmations=confirmations, tx_timeout_s=EXTERNAL_TX_TIMEOUT_S)
        wanted = self.consortium.chain.chain_id if self.consortium else None
        if wanted is not None and chain.chain_id != wanted:
            chain.close()
            raise StackRefused(f"chain.chain_id is {wanted}, but the node at {url} reports chain id {chain.chain_id}"
                               "; nothing was deployed")
        self.rpc_url, self.external = url, True
        return chain, self.deployer

    def _top_up(self, address: str) -> None:
        """On an external chain, give a service account (the KMS signer, the API proposer) gas money when it runs
        low; the embedded chain funds them generously once."""
        if self.chain.w3.eth.get_balance(address) < EXTERNAL_SERVICE_FUNDS // 10:
            self.chain.fund(self._funder, address, EXTERNAL_SERVICE_FUNDS)

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

        def spawn() -> ManagedProcess:   # a restart: the same URL, state folder and passphrase
            return ManagedProcess(
                "kms",
                [sys.executable, "-m", "kms", "--state-dir", str(self.state_dir / "kms"), "--rpc-url", rpc_url,
                 "--dstack-kms", registry_address, "--port", url.rsplit(":", 1)[1], "--signer-keystore",
                 str(signer_keystore), "--dev", "--simulated-root", str(root_der),
                 "--confirmations", str(self.chain.confirmations)],
                ready=answers, log_path=self.state_dir / "kms.log",
                env={KMS_PASSPHRASE_ENV: self._kms_passphrase, "SEALROOM_KMS_SIGNER_PASSWORD": self._service_password},
            )

        try:
            self._kms = spawn()
        except ServiceStartError as exc:
            if existed and "passphrase" in str(exc):
                raise StackRefused(f"the KMS root store {store} does not open with the passphrase from "
                                   f"{self._kms_passphrase_source} ({exc}); set {KMS_PASSPHRASE_ENV} to the "
                                   "passphrase it was sealed with. The store is left untouched") from None
            raise
        self._supervisor.watch("kms", self._kms, spawn, log_path=self.state_dir / "kms.log")
        self._exit.callback(self._supervisor.stop, "kms")
        return url, client.meta()

    def restart_kms(self) -> wire.Meta:
        """Stop the KMS and start it again on the same state folder (its root keys survive, encrypted at rest)."""
        self._kms = self._supervisor.process("kms") or self._kms
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
        funder = self._funder
        funds = EXTERNAL_SERVICE_FUNDS if self.external else _FUNDS
        if deployment.api_proposer_keystore:
            keystore = self.state_dir / deployment.api_proposer_keystore
            proposer = read_keystore(keystore, self._service_password)
            if self.chain.w3.eth.get_balance(proposer.address) < funds // (10 if self.external else 100):
                self.chain.fund(funder, proposer.address, funds)
        else:
            relative = f"{_KEYSTORES}/api-proposer.json"
            keystore = self.state_dir / relative
            proposer = Account.create()
            try:
                write_keystore(proposer, keystore, self._service_password)
            except FileExistsError:
                raise StackRefused(f"{keystore} exists but {DEPLOYMENT_FILE} does not name it: it is not this "
                                   "stack's and is left as it is") from None
            self.chain.fund(funder, proposer.address, funds)
            deployment.api_proposer, deployment.api_proposer_keystore = proposer.address, relative
            deployment.save(self.state_dir)
        url = f"http://127.0.0.1:{_port_if_free(deployment.last_urls.get('api')) or free_loopback_port()}"
        api_dir = self.state_dir / "api"
        if self.study_backend is None:   # the engine (stopped after the API) and the study image, once
            self.study_backend = prepare_study_backend(self.backend, self.state_dir, d, exit_stack=self._exit,
                                                       image_digests=self.image_digests, hidden=[api_dir],
                                                       notify=self.notify)
        backend_args = self.study_backend.api_args

        def answers() -> bool:
            try:
                return httpx.get(f"{url}/openapi.json", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        def spawn() -> ManagedProcess:   # a restart: the same URL and state folder
            return ManagedProcess(
                "api",
                [sys.executable, "-m", "compose.api", "--stack-state-dir", str(self.state_dir), "--state-dir",
                 str(api_dir), "--port", url.rsplit(":", 1)[1], "--proposer-keystore", str(keystore), *backend_args],
                ready=answers, log_path=self.state_dir / "api.log",
                env={"SEALROOM_API_PROPOSER_PASSWORD": self._service_password},
            )

        process = spawn()
        self._supervisor.watch("api", process, spawn, log_path=self.state_dir / "api.log")
        self._exit.callback(self._supervisor.stop, "api")
        d.services["api"] = {"pid": process.pid, "url": url, "state_dir": str(api_dir),
                             "proposer": proposer.address, "backend": self.study_backend.record}
        d.save(self.state_dir)
        deployment.last_urls["api"] = url
        deployment.save(self.state_dir)
        return url

    def start_console(self) -> str:
        """Start the owners' approval console (`python -m console`) on loopback, with its own funded relayer
        account (``keystores/console-relayer.json``) that relays owners' EIP-712 approvals; return its URL."""
        d, deployment = self.description, self.deployment
        funds = EXTERNAL_SERVICE_FUNDS if self.external else _FUNDS
        keystore = self.state_dir / _KEYSTORES / "console-relayer.json"
        if keystore.exists():
            relayer = read_keystore(keystore, self._service_password)
        else:
            relayer = Account.create()
            write_keystore(relayer, keystore, self._service_password)
        if self.chain.w3.eth.get_balance(relayer.address) < funds // (10 if self.external else 100):
            self.chain.fund(self._funder, relayer.address, funds)
        url = f"http://127.0.0.1:{_port_if_free(deployment.last_urls.get('console')) or free_loopback_port()}"

        def answers() -> bool:
            try:
                return httpx.get(f"{url}/", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        def spawn() -> ManagedProcess:   # a restart: the same URL
            return ManagedProcess(
                "console",
                [sys.executable, "-m", "console", "--stack-state-dir", str(self.state_dir), "--port",
                 url.rsplit(":", 1)[1], "--relayer-keystore", str(keystore)],
                ready=answers, log_path=self.state_dir / "console.log",
                env={"SEALROOM_CONSOLE_RELAYER_PASSWORD": self._service_password},
            )

        process = spawn()
        self._supervisor.watch("console", process, spawn, log_path=self.state_dir / "console.log")
        self._exit.callback(self._supervisor.stop, "console")
        d.services["console"] = {"pid": process.pid, "url": url, "relayer": relayer.address}
        d.save(self.state_dir)
        deployment.last_urls["console"] = url
        deployment.save(self.state_dir)
        return url

    # --- supervision ------------------------------------------------------------------------------------------------

    def supervise(self, until: Callable[[], bool] | None = None, *, poll_s: float = 0.25) -> None:
        """Watch anvil, the KMS and the API until ``until()`` is true (without it, until interrupted): one that
        exits is started again on the same port and state (the chain reloads its state file, the KMS reopens its
        root store), after a back-off of 0.5 s doubling up to 30 s, reset once it has stayed up a minute. Each
        restart is logged in the service's log and recorded in its stack.json entry (``restarts``,
        ``last_exit_code``, ``last_restart_at``, ``status``), where `seal status` shows it."""
        while until is None or not until():
            self._supervisor.check()
            time.sleep(poll_s)

    def _service_changed(self, name: str, fields: dict) -> None:
        if self.description is None or name not in self.description.services:
            return
        self.description.services[name].update(fields)
        self.description.save(self.state_dir)

    def stop(self) -> None:
        self._exit.close()
