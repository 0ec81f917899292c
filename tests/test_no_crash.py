"""No input crashes a service, and no refusal echoes its input (issue 11).

Each real service of a local stack (the KMS, the analysts' API, a SIMULATED CVM's guest agent; each its own
process) is sent a body nested 100 000 deep, 20 MB bodies (declared, and chunked), and a compose whose YAML nests
50 000 deep. Each answer must be a 400 or 413 that does not carry the body back, and the process must still be
alive and serving afterwards. Before the fix the nested body killed the KMS and the API with SIGSEGV: py_ecc,
imported by eth_account, raises the recursion limit to 100 000, and the C JSON decoder then runs off the stack.

Every entry point must start with the recursion limit back at CPython's default; the ``seal`` command must
answer crafted files with one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from eth_account import Account

from compose.app_compose import _REQUIRED_SETTINGS, compose_hash, normalized_json_bytes
from compose.auth import issue_token
from compose.backends import ManagedProcess, free_loopback_port
from compose.safe_parse import DEFAULT_RECURSION_LIMIT
from compose.stack_file import DEV_KEYSTORE_PASSWORD, read_keystore, write_keystore
from contracts.chain import DstackApp
from kms_client.client import KmsClient, KmsRefused
from tests.simulated_cvm import SimulatedCvm
from tests.study_world import SITES, start_study_stack
from tests.test_api_composes import submission

DEEP = b"[" * 100_000                    # the reproduction: a 100 KB body, nested 100 000 deep
HUGE = 20_000_000                        # 20 MB
DEEP_YAML = "services: " + "[" * 50_000 + "]" * 50_000


@dataclass
class World:
    stack: object
    kms_url: str
    api_url: str
    agent_socket: str
    pids: dict[str, int]
    token: str
    owners: dict
    study: DstackApp
    compose_hash: str            # submitted through the API, allowed on-chain

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = tmp_path_factory.mktemp("no-crash")
    with start_study_stack(state) as stack:
        api_url = stack.start_api()
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        study = DstackApp(stack.chain, d.dstack_app)
        token = issue_token(Path(d.services["api"]["state_dir"]), "alice")
        submitted = httpx.post(f"{api_url}/composes", json=submission(owners, study="no-crash"), timeout=60,
                               headers={"Authorization": f"Bearer {token}"})
        assert submitted.status_code == 201, submitted.text
        h = submitted.json()["compose_hash"]
        approve(study, owners, bytes.fromhex(h), propose=False)
        (state / "app-compose.json").write_text(submitted.json()["app_compose"], encoding="utf-8")
        socket_path = stack.start_cvm(state / "app-compose.json")
        d = stack.description
        yield World(stack, d.services["kms"]["url"], api_url, socket_path,
                    {name: d.services[name]["pid"] for name in ("kms", "api", "cvm")}, token, owners, study, h)


def approve(study: DstackApp, owners: dict, h: bytes, *, propose: bool = True) -> None:
    if propose:
        study.propose(h, "", owners["A"])
    for name in SITES:
        study.approve(h, owners[name])


# --- talking to a service: raw HTTP, so that a body can be declared and not sent, or sent while the answer is read

def _tcp(url: str) -> Callable[[], socket.socket]:
    parts = urlsplit(url)
    return lambda: socket.create_connection((parts.hostname, parts.port), timeout=60)


def _unix(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(path)
        return sock
    return connect


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def exchange(connect: Callable[[], socket.socket], path: str, body: Iterable[bytes], *,
             length: int | None, headers: dict[str, str] | None = None) -> Answer:
    """POST ``body`` (Content-Length ``length``, or chunked when None), sending from a thread while the answer is
    read: a service may answer before it has read everything, and then stop reading."""
    head = [f"POST {path} HTTP/1.1", "Host: service", "Connection: close"]
    head += [f"{name}: {value}" for name, value in {"Content-Type": "application/json", **(headers or {})}.items()]
    head.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    sock = connect()

    def feed() -> None:
        try:
            for chunk in body:
                sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if length is None:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the service answered and closed: what it did not read was never meant to be

    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    received = b""
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    assert received, "the connection closed without an answer: did the service die?"
    status_line, _, rest = received.partition(b"\r\n")
    head_block, _, content = rest.partition(b"\r\n\r\n")
    fields = dict(line.decode().split(": ", 1) for line in head_block.split(b"\r\n") if b": " in line)
    fields = {name.lower(): value for name, value in fields.items()}
    if fields.get("transfer-encoding") == "chunked":
        content = _unchunk(content)
    return Answer(int(status_line.split()[1]), fields, content)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def zeros(total: int, chunk: int = 1 << 20) -> Iterable[bytes]:
    for start in range(0, total, chunk):
        yield b"0" * min(chunk, total - start)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


SERVICES = {
    # name: (how to reach it, a JSON route with a large cap, one with a small cap (the same where all are alike))
    "kms": (lambda w: _tcp(w.kms_url), "/prpc/GetAppKey", "/prpc/GetOwnerSealKey"),
    "api": (lambda w: _tcp(w.api_url), "/composes", "/composes"),
    "cvm": (lambda w: _unix(w.agent_socket), "/GetKey", "/prpc/Sign"),
}


def serves(world: World, name: str) -> bool:
    if name == "kms":
        with KmsClient(world.kms_url) as kms:
            return bool(kms.meta().root_address)
    if name == "api":
        return httpx.get(f"{world.api_url}/openapi.json", timeout=30).status_code == 200
    with httpx.Client(transport=httpx.HTTPTransport(uds=world.agent_socket), timeout=30) as agent:
        return agent.get("http://agent/Version").status_code == 200


@contextmanager
def still_serving(world: World, name: str):
    yield
    assert alive(world.pids[name]), f"the {name} process died"
    assert serves(world, name), f"the {name} process no longer answers"


def assert_not_echoed(answer: Answer, sent: bytes) -> None:
    assert len(answer.body) < 2_000, answer.body[:200]
    assert sent[:64] not in answer.body


# --- the bodies -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_body_nested_100_000_deep_is_refused_and_the_service_lives(world, name):
    connect, large_route, _ = SERVICES[name]
    with still_serving(world, name):
        answer = exchange(connect(world), large_route, [DEEP], length=len(DEEP))
    assert answer.status == 400, answer
    assert "nests deeper than 64 levels" in answer.body.decode()
    assert_not_echoed(answer, DEEP)


def test_the_body_cap_comes_before_the_nesting_check(world):
    """A KMS route for small requests refuses 100 KB of brackets for its size alone, as a bad request."""
    with still_serving(world, "kms"):
        answer = exchange(_tcp(world.kms_url), "/prpc/GetOwnerSealKey", [DEEP], length=len(DEEP))
    assert answer.status == 413 and answer.headers["connection"] == "close"
    assert answer.json() == {"error": answer.json()["error"], "reason": "bad_request"}
    assert_not_echoed(answer, DEEP)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_20_mb_body_is_refused_unread_and_the_service_lives(world, name, chunked):
    connect, large_route, small_route = SERVICES[name]
    with still_serving(world, name):
        for route in {large_route, small_route}:
            if chunked:
                answer = exchange(connect(world), route, zeros(HUGE), length=None)
            else:  # declared: refused on the header alone; nothing of the body is sent
                answer = exchange(connect(world), route, [], length=HUGE)
            assert answer.status == 413, (route, answer)
            assert "the most this route takes" in answer.body.decode() or "at most" in answer.body.decode()
            assert_not_echoed(answer, b"0" * 64)


def test_a_compose_whose_yaml_nests_50_000_deep_is_refused_and_the_api_lives(world):
    body = submission(world.owners, study="deep-yaml")
    body["docker_compose"] = DEEP_YAML
    sent = json.dumps(body).encode()
    with still_serving(world, "api"):
        answer = exchange(_tcp(world.api_url), "/composes", [sent], length=len(sent),
                          headers={"Authorization": f"Bearer {world.token}"})
    assert answer.status == 400, answer
    assert answer.json() == {"detail": "docker_compose: the YAML is nested deeper than 64 levels"}


def test_yaml_anchors_cannot_stack_past_the_limit(world):
    """Aliases reuse an anchored node: twelve anchors of depth six nest 72 deep without the text ever doing so."""
    lines = ["services:", "  study:", "    image: x", "x-0: &a0 [[[[[[1]]]]]]"]
    lines += [f"x-{i}: &a{i} [[[[[[*a{i - 1}]]]]]]" for i in range(1, 12)]
    body = submission(world.owners, study="aliases")
    body["docker_compose"] = "\n".join(lines) + "\n"
    with httpx.Client(base_url=world.api_url, timeout=60) as client:
        answer = client.post("/composes", json=body, headers=world.auth)
    assert answer.status_code == 400 and "nested deeper than 64" in answer.json()["detail"]


def test_unauthenticated_bodies_are_checked_before_the_token(world):
    """The reproduction: POST /composes with no token at all."""
    with still_serving(world, "api"):
        answer = exchange(_tcp(world.api_url), "/composes", [DEEP], length=len(DEEP))
    assert answer.status == 400


# --- the sealed-file upload: streamed to disk, capped -------------------------------------------------------------

def run_folders(world: World, api_state: Path | None = None) -> set[Path]:
    return set(((api_state or Path(world.stack.description.services["api"]["state_dir"])) / "runs").iterdir())


def test_more_sealed_files_than_inputs_are_refused_at_the_first_one_too_many(world):
    before = run_folders(world)
    files = [("sealed", (f"{i}.sealed", b"x" * 1000)) for i in range(3)]
    with still_serving(world, "api"):
        answer = httpx.post(f"{world.api_url}/composes/{world.compose_hash}/runs", files=files, headers=world.auth,
                            timeout=60)
    assert answer.status_code == 422 and "lists 2 inputs" in answer.json()["detail"]
    assert "got more than 2" in answer.json()["detail"]
    assert run_folders(world) == before


@pytest.mark.parametrize(("content", "headers", "status", "fragment"), [
    (b'{"sealed": []}', {"Content-Type": "application/json"}, 422, "multipart/form-data"),
    (b"--b\r\nContent-Disposition: form-data; name=sealed; filename=a\r\nX-Pad: " + b"p" * 20_000 + b"\r\n\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}, 422, "not valid multipart/form-data"),
], ids=["not-multipart", "part-headers-too-long"])
def test_an_upload_that_is_not_one_is_refused(world, content, headers, status, fragment):
    before = run_folders(world)
    with still_serving(world, "api"):
        answer = httpx.post(f"{world.api_url}/composes/{world.compose_hash}/runs", content=content, timeout=60,
                            headers={**world.auth, **headers})
    assert answer.status_code == status and fragment in answer.json()["detail"]
    assert "p" * 100 not in answer.text
    assert run_folders(world) == before


def test_sealed_files_over_the_upload_cap_are_refused_and_nothing_is_kept(world, tmp_path):
    """An API started with --max-upload-bytes 100000: the upload is cut at the cap (413) and its folder removed."""
    state = tmp_path / "small-api"
    (state / "composes").mkdir(parents=True)
    known = Path(world.stack.description.services["api"]["state_dir"]) / "composes" / f"{world.compose_hash}.json"
    (state / "composes" / known.name).write_bytes(known.read_bytes())
    keystore = tmp_path / "proposer.json"
    write_keystore(Account.create(), keystore, DEV_KEYSTORE_PASSWORD)   # never proposes: needs no funds
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/openapi.json", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    api = ManagedProcess("small-api", [sys.executable, "-m", "compose.api", "--stack-state-dir",
                                       str(world.stack.state_dir), "--state-dir", str(state), "--port", str(port),
                                       "--proposer-keystore", str(keystore), "--max-upload-bytes", "100000",
                                       "--backend", "process"],
                         ready=answers, log_path=tmp_path / "small-api.log",
                         env={"SEALROOM_API_PROPOSER_PASSWORD": DEV_KEYSTORE_PASSWORD})
    try:
        headers = {"Authorization": f"Bearer {issue_token(state, 'alice')}"}
        route = f"/composes/{world.compose_hash}/runs"
        # Declared: refused on the length alone.
        files = [("sealed", (f"{i}.sealed", b"z" * 60_000)) for i in range(2)]
        answer = httpx.post(f"{url}{route}", files=files, headers=headers, timeout=60)
        assert answer.status_code == 413 and "this route takes at most 100000 bytes" in answer.json()["detail"]
        # Chunked: the first file is written as it arrives, the second passes the cap, and the folder goes.
        parts = [b"--b\r\nContent-Disposition: form-data; name=sealed; filename=%d.sealed\r\n\r\n" % i
                 + b"z" * 60_000 + b"\r\n" for i in range(2)]
        answer = exchange(_tcp(url), route, [*parts, b"--b--\r\n"], length=None,
                          headers={**headers, "Content-Type": "multipart/form-data; boundary=b"})
        assert answer.status == 413 and "over 100000 bytes" in answer.json()["detail"], answer
        assert "z" * 64 not in answer.body.decode()
        assert list((state / "runs").iterdir()) == []
        assert alive(api.pid) and httpx.get(f"{url}/openapi.json", timeout=30).status_code == 200
    finally:
        api.stop()


# --- 422s without the input -------------------------------------------------------------------------------------

MARKER = "do-not-echo-" + "x" * 200


def test_the_apis_422_does_not_echo_the_request(world):
    body = submission(world.owners, study="echo")
    body["manifest"]["epsilon"] = MARKER              # not a number
    body[MARKER] = MARKER                             # a field nobody asked for
    with httpx.Client(base_url=world.api_url, timeout=60) as client:
        answer = client.post("/composes", json=body, headers=world.auth)
    assert answer.status_code == 422
    errors = answer.json()["detail"]
    assert {tuple(e["loc"][:3]) for e in errors} >= {("body", "manifest", "epsilon")}
    assert all(set(e) == {"type", "loc", "msg"} for e in errors)
    assert "x" * 60 not in answer.text      # a field name taken from the body is cut to 64 characters


def test_the_kms_422_does_not_echo_the_request(world):
    with still_serving(world, "kms"):
        answer = httpx.post(f"{world.kms_url}/prpc/GetOwnerSealKey", timeout=30,
                            json={"app_id": {"nested": MARKER}, "compose_hash": MARKER, MARKER: 1})
    assert answer.status_code == 422
    assert "x" * 60 not in answer.text      # a field name taken from the body is cut to 64 characters


def test_invalid_json_is_a_422_without_the_body(world):
    sent = b'{"name": "' + MARKER.encode() + b'", '
    answer = httpx.post(f"{world.api_url}/composes", content=sent, timeout=30,
                        headers={"Authorization": f"Bearer {world.token}", "Content-Type": "application/json"})
    assert answer.status_code == 422 and MARKER not in answer.text


# --- nesting hidden in strings: the second line of defence ----------------------------------------------------------

def test_an_event_log_nested_deep_inside_an_attestation_is_a_refusal(world):
    """The request body is shallow; the event log it carries as a string is not. The KMS parses that string
    only after the quote verifies: a refusal (bad_quote), not a crash."""
    d = world.stack.description
    app_id = bytes.fromhex(d.dstack_app[2:])
    recipe = (world.stack.state_dir / "app-compose.json").read_bytes()
    cvm = SimulatedCvm(world.stack.state_dir, app_id, recipe)

    def attest(report_data: bytes) -> tuple[bytes, str]:
        quote, _log = cvm.attest(report_data)
        return quote, "[" * 100_000

    with still_serving(world, "kms"), KmsClient(world.kms_url) as kms, \
            pytest.raises(KmsRefused, match="not valid JSON") as refused:
        kms.get_app_key(attest, app_id=app_id)
    assert refused.value.code == "bad_quote"


def test_an_attested_compose_with_deep_yaml_is_a_bad_request(world):
    """A recipe the owners approved whose YAML nests 50 000 deep: the KMS reads its manifest only when it
    releases owner keys, and refuses it there."""
    d = world.stack.description
    app_id = bytes.fromhex(d.dstack_app[2:])
    recipe = normalized_json_bytes({"name": "deep", "docker_compose_file": DEEP_YAML, **_REQUIRED_SETTINGS})
    approve(world.study, world.owners, compose_hash(recipe))
    cvm = SimulatedCvm(world.stack.state_dir, app_id, recipe)
    with still_serving(world, "kms"), KmsClient(world.kms_url) as kms, \
            pytest.raises(KmsRefused, match="nested deeper than 64 levels") as refused:
        kms.release_owner_keys(cvm.attest, recipe)
    assert refused.value.code == "bad_request"
    assert world.study.budget().spent_micro == 0


# --- entry points: the recursion limit ----------------------------------------------------------------------------

_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print(f"recursion-limit={sys.getrecursionlimit()}", flush=True))
sys.argv = [MODULE, "--help"]
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
"""

_SEAL_PROBE = """
import atexit, sys
from importlib.metadata import entry_points
atexit.register(lambda: print(f"recursion-limit={sys.getrecursionlimit()}", flush=True))
(seal,) = entry_points(group="console_scripts", name="seal")
seal.load()(["--help"])
"""


def _limit_after(script: str) -> int:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("recursion-limit=")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return int(lines[-1].split("=")[1])


@pytest.mark.parametrize("module", ["kms", "compose.api", "cvm.agent_sim", "cvm.run", "cvm.aggregator"])
def test_each_service_entry_point_restores_the_recursion_limit(module):
    assert _limit_after(_PROBE.replace("MODULE", repr(module))) == DEFAULT_RECURSION_LIMIT


def test_the_seal_command_restores_the_recursion_limit():
    assert _limit_after(_SEAL_PROBE) == DEFAULT_RECURSION_LIMIT


def test_the_probe_sees_the_limit_eth_account_sets():
    """The check above can fail: importing eth_account alone leaves the limit at py_ecc's 100 000."""
    assert _limit_after("import atexit, sys\natexit.register(lambda: print(f'recursion-limit="
                        "{sys.getrecursionlimit()}'))\nimport eth_account") == 100_000


# --- the seal command on crafted files ------------------------------------------------------------------------------

MAGIC = b"sealroom.sealed/v1\n"


def _seal(*args: str) -> subprocess.CompletedProcess:
    script = "import sys\nfrom sealing_cli.main import app\napp(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "COLUMNS": "300"})


@pytest.mark.parametrize(("content", "fragment"), [
    (MAGIC + struct.pack(">I", 1_000_000) + b"[" * 1_000_000 + b"\0" * 64, "nested deeper than 64 levels"),
    (MAGIC + struct.pack(">I", 0xFFFF_FFFF) + b"{}", "head block length 4294967295 is out of range"),
    (MAGIC + struct.pack(">I", 2) + b"{}", "head block must be a JSON object"),
], ids=["deep-head", "huge-header-length", "empty-head"])
def test_seal_inspect_answers_a_crafted_file_with_one_error_line(tmp_path, content, fragment):
    crafted = tmp_path / "crafted.sealed"
    crafted.write_bytes(content)
    done = _seal("inspect", str(crafted))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], done.stderr[-2000:]


@pytest.mark.parametrize("content", [b"[" * 2_000_000, b'{"a":' * 300_000, b"{}" + b" " * 10],
                         ids=["deep-array", "deep-object", "not-a-receipt"])
def test_seal_verify_answers_a_crafted_receipt_with_one_error_line(tmp_path, content):
    crafted = tmp_path / "attestation.json"
    crafted.write_bytes(content)
    done = _seal("verify", str(crafted), "--rpc", "http://127.0.0.1:9", "--state-dir", str(tmp_path))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    if content.startswith((b"[[", b'{"a')):
        assert "nested deeper than 64 levels" in errors[0]
