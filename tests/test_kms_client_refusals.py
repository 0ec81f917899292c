"""The KMS client's own checks of the KMS's answers (kms_client/client.py), driven against a tampering KMS: a small
local HTTP server in front of the real KMS of a local stack, which forwards each call and may rewrite the request
and the answer. The root is pinned from DstackKms on-chain, never taken from the KMS's own GetMeta.

What a man in the middle (or a lying KMS) can do and what the client must say:
- owner sealing key: wrong pinned root, bad signature, an answer about another owner (labelled as such, or relabelled
  so that only the signature tells), a swapped public key, an impostor root, a stale answer, a malformed answer;
- app key: wrong pinned root, bad or malformed signature, another app's genuine key relayed, an impostor root,
  a box that does not open (altered, or sealed to another key), a box whose content is not an app key;
- owner keys: a box that does not open, a box whose content is not owner keys;
- transport: an HTTP error, a 403 with and without a well-formed refusal, an unreachable KMS.
The untampered answers are accepted through the same proxy (the control).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_account import Account
from eth_keys import keys as eth_keys

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp, DstackKms
from kms_client.box import raw_public, seal_answer
from kms_client.client import (
    KmsAnswerInvalid,
    KmsClient,
    KmsError,
    KmsRefused,
    KmsUnreachable,
)
from kms_client.messages import app_key_issued_digest, owner_seal_pubkey_digest
from sealing_cli.devchain import ANVIL_FUNDER_KEY
from sealing_cli.stack import LocalStack
from tests.simulated_cvm import SimulatedCvm

YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "5" * 64 + "\n"
IMPOSTOR_ROOT = eth_keys.PrivateKey(b"\x07" * 32)


class TamperingKms:
    """A loopback HTTP server in front of the real KMS. `rules[method](body, forward)` answers one pRPC method:
    `forward(body)` asks the real KMS and returns its httpx.Response; the rule returns (status, body bytes)."""

    def __init__(self, upstream: str):
        self.rules: dict = {}
        self.seen: list[str] = []
        self._upstream = httpx.Client(base_url=upstream, timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                method = self.path.rsplit("/", 1)[-1]
                body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
                proxy.seen.append(method)

                def forward(request: dict) -> httpx.Response:
                    return proxy._upstream.post(self.path, json=request)

                rule = proxy.rules.get(method)
                if rule is None:
                    answer = forward(body)
                    status, content = answer.status_code, answer.content
                else:
                    status, content = rule(body, forward)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()


def edit_answer(change):
    """A rule that forwards the call unchanged and edits the real KMS's JSON answer with `change(answer, body)`."""
    def rule(body, forward):
        answer = forward(body)
        assert answer.status_code == 200, answer.text
        edited = answer.json()
        change(edited, body)
        return 200, json.dumps(edited).encode()
    return rule


def sealed_to_caller(attestation: dict, plaintext: bytes) -> dict:
    """What anyone on the path can do: seal any content to the ephemeral key the CVM put in its request."""
    return seal_answer(plaintext, nonce=bytes.fromhex(attestation["nonce"]),
                       cvm_pub=bytes.fromhex(attestation["ephemeral_pubkey"])).to_wire()


def flip_hex(text: str, position: int) -> str:
    raw = bytearray(bytes.fromhex(text))
    raw[position] ^= 0x01
    return raw.hex()


class World:
    def __init__(self, stack: LocalStack, proxy: TamperingKms):
        d = stack.description
        self.stack, self.proxy = stack, proxy
        self.owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        self.app_id = bytes.fromhex(d.dstack_app[2:])
        # The root everyone pins: the one the operator registered on-chain, not what the KMS says of itself.
        self.root = DstackKms(stack.chain, d.dstack_kms).kms_root_pubkey()
        self.root_address = eth_keys.PublicKey.from_compressed_bytes(self.root).to_checksum_address()
        manifest = StudyManifest.model_validate({
            "study": "kms-client-refusals", "inputs": [{"owner": self.owners[n].address, "name": f"cohort-{n}"}
                                                       for n in "AB"],
            "analysis": {"kind": "dp_stats", "params": {"max_rows": 1000, "queries": [{"kind": "count", "name": "n"}]}},
            "epsilon": 0.1, "delta": 1e-6, "output_type": "aggregate_stats"})
        self.app_compose = normalized_json_bytes(build_app_compose("kms-client-refusals", YAML, manifest))
        self.compose_hash = compose_hash(self.app_compose)
        self.study = DstackApp(stack.chain, d.dstack_app)
        self.study.propose(self.compose_hash, "", self.owners["A"])
        for name in "AB":
            self.study.approve(self.compose_hash, self.owners[name])
        self.cvm = SimulatedCvm(stack.state_dir, self.app_id, self.app_compose)

    def client(self, url: str | None = None) -> KmsClient:
        return KmsClient(url or self.proxy.url)

    def seal_key(self, owner: str = "A", **kwargs):
        kwargs.setdefault("pinned_root_address", self.root_address)
        with self.client() as kms:
            return kms.owner_seal_key(self.stack.description.dstack_app, self.compose_hash,
                                      self.owners[owner].address, **kwargs)

    def app_key(self, **kwargs):
        kwargs.setdefault("pinned_root_pubkey", self.root)
        with self.client() as kms:
            return kms.get_app_key(self.cvm.attest, app_id=self.app_id, **kwargs)

    def owner_keys(self):
        with self.client() as kms:
            return kms.release_owner_keys(self.cvm.attest, self.app_compose)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("kms-client"), owner_names=("A", "B"), threshold=2,
                    epsilon_budget=10.0) as stack:
        proxy = TamperingKms(stack.description.services["kms"]["url"])
        try:
            yield World(stack, proxy)
        finally:
            proxy.close()


@pytest.fixture
def kms(world):
    world.proxy.rules.clear()
    yield world
    world.proxy.rules.clear()


@pytest.fixture(scope="module")
def other_app(world):
    """A second study, registered in the same DstackKms, whose CVM gets its own genuine app key from the KMS."""
    d, funder = world.stack.description, Account.from_key(ANVIL_FUNDER_KEY)
    app = DstackApp.deploy(world.stack.chain, funder, owners=[world.owners["A"].address], threshold=1,
                           epsilon_budget=1.0, kms_signer=d.kms_signer)
    world.stack.registry.register_app(app.address, funder)
    body = b'{"name":"another study"}'
    app.propose(compose_hash(body), "", world.owners["A"])
    app.approve(compose_hash(body), world.owners["A"])
    cvm = SimulatedCvm(world.stack.state_dir, app.app_id, body)
    with KmsClient(d.services["kms"]["url"]) as direct:
        return app.app_id, direct.get_app_key(cvm.attest, app_id=app.app_id, pinned_root_pubkey=world.root)


# ---------------------------------------------------------------------------------- owner sealing key


def test_the_genuine_owner_seal_key_is_accepted(kms):
    key = kms.seal_key()
    assert len(raw_public(key)) == 32 and kms.proxy.seen[-1] == "GetOwnerSealKey"
    assert raw_public(kms.seal_key("B")) != raw_public(key)


def test_an_owner_seal_key_under_another_pinned_root_is_refused(kms):
    other = IMPOSTOR_ROOT.public_key.to_checksum_address()
    with pytest.raises(KmsAnswerInvalid, match=f"not the pinned KMS root {other}"):
        kms.seal_key(pinned_root_address=other)


@pytest.mark.parametrize("position", [0, 40, 64], ids=["r", "s", "v"])
def test_an_owner_seal_key_with_a_bad_signature_is_refused(kms, position):
    kms.proxy.rules["GetOwnerSealKey"] = edit_answer(
        lambda answer, _body: answer.update(signature=flip_hex(answer["signature"], position)))
    with pytest.raises(KmsAnswerInvalid, match="not the pinned KMS root|malformed signature"):
        kms.seal_key()


def test_an_owner_seal_key_labelled_for_another_owner_is_refused(kms):
    kms.proxy.rules["GetOwnerSealKey"] = edit_answer(
        lambda answer, _body: answer.update(owner=kms.owners["B"].address))
    with pytest.raises(KmsAnswerInvalid, match="answered for another app, recipe or owner"):
        kms.seal_key("A")


@pytest.mark.parametrize("field", ["app_id", "compose_hash"])
def test_an_owner_seal_key_labelled_for_another_app_or_recipe_is_refused(kms, field):
    other = {"app_id": "0x" + "42" * 20, "compose_hash": "42" * 32}[field]
    kms.proxy.rules["GetOwnerSealKey"] = edit_answer(lambda answer, _body: answer.update({field: other}))
    with pytest.raises(KmsAnswerInvalid, match="answered for another app, recipe or owner"):
        kms.seal_key()


def test_another_owners_genuine_key_relabelled_as_mine_is_refused(kms):
    """The proxy asks the real KMS for B's key and hands it to A under A's labels: only the signature tells."""
    def rule(body, forward):
        answer = forward({**body, "owner": kms.owners["B"].address}).json()
        answer["owner"] = body["owner"]
        return 200, json.dumps(answer).encode()

    kms.proxy.rules["GetOwnerSealKey"] = rule
    with pytest.raises(KmsAnswerInvalid, match="or for another app, recipe or owner"):
        kms.seal_key("A")


def test_an_owner_seal_key_swapped_for_the_proxys_own_is_refused(kms):
    mine = raw_public(X25519PrivateKey.generate()).hex()
    kms.proxy.rules["GetOwnerSealKey"] = edit_answer(lambda answer, _body: answer.update(public_key=mine))
    with pytest.raises(KmsAnswerInvalid, match="not the pinned KMS root"):
        kms.seal_key()


def test_an_owner_seal_key_vouched_for_by_an_impostor_root_is_refused(kms):
    def impostor(body, _forward):
        public, now = raw_public(X25519PrivateKey.generate()), int(time.time())
        digest = owner_seal_pubkey_digest(bytes.fromhex(body["app_id"][2:]), bytes.fromhex(body["compose_hash"]),
                                          bytes.fromhex(body["owner"][2:]), public, now)
        return 200, json.dumps({**body, "public_key": public.hex(), "timestamp": now,
                                "signature": IMPOSTOR_ROOT.sign_msg_hash(digest).to_bytes().hex()}).encode()

    kms.proxy.rules["GetOwnerSealKey"] = impostor
    with pytest.raises(KmsAnswerInvalid, match=f"signed by {IMPOSTOR_ROOT.public_key.to_checksum_address()}"):
        kms.seal_key()
    assert kms.proxy.seen[-1] == "GetOwnerSealKey"


@pytest.mark.parametrize(("skew", "reason"), [(301, "stale"), (-61, "in the future")])
def test_an_owner_seal_key_signed_too_long_ago_or_ahead_is_refused(kms, skew, reason):
    with pytest.raises(KmsAnswerInvalid, match=reason):
        kms.seal_key(now=int(time.time()) + skew)


@pytest.mark.parametrize("change", [
    lambda answer: answer.pop("signature"),
    lambda answer: answer.update(timestamp="yesterday"),
    lambda answer: answer.update(signature="zz" * 65),
    lambda answer: answer.update(public_key="00" * 31),
    lambda answer: answer.update(signature=answer["signature"][:-2]),
], ids=["missing-field", "wrong-type", "not-hex", "short-key", "short-signature"])
def test_a_malformed_owner_seal_key_answer_is_refused(kms, change):
    kms.proxy.rules["GetOwnerSealKey"] = edit_answer(lambda answer, _body: change(answer))
    with pytest.raises(KmsAnswerInvalid, match="malformed|must be 65 bytes"):
        kms.seal_key()


# ---------------------------------------------------------------------------------- app key


def test_the_genuine_app_key_is_accepted_under_the_pinned_root(kms):
    key = kms.app_key()
    assert key.kms_root_pubkey == kms.root and key.simulated and len(key.k256_key) == 32
    assert kms.proxy.seen[-2:] == ["GetNonce", "GetAppKey"]


def test_an_app_key_under_another_pinned_root_is_refused(kms):
    with pytest.raises(KmsAnswerInvalid, match="not issued by the pinned KMS root"):
        kms.app_key(pinned_root_pubkey=IMPOSTOR_ROOT.public_key.to_compressed_bytes())


def forged_app_key(content):
    """A rule: the real KMS answers (and uses up the nonce); the proxy replaces the box with `content(attestation)`
    sealed to the caller's ephemeral key."""
    def rule(body, forward):
        answer = forward(body)
        assert answer.status_code == 200, answer.text
        plaintext = content(body)
        return 200, json.dumps({**answer.json(), "box": sealed_to_caller(body, plaintext)}).encode()
    return rule


@pytest.fixture(scope="module")
def genuine_app_key(world):
    with KmsClient(world.stack.description.services["kms"]["url"]) as direct:
        return direct.get_app_key(world.cvm.attest, app_id=world.app_id, pinned_root_pubkey=world.root)


@pytest.mark.parametrize(("position", "length"), [(0, 65), (40, 65), (64, 65), (0, 64)],
                         ids=["r", "s", "v", "64-bytes"])
def test_an_app_key_with_a_bad_signature_is_refused(kms, genuine_app_key, position, length):
    signature = bytes.fromhex(flip_hex(genuine_app_key.k256_signature.hex(), position))[:length]
    kms.proxy.rules["GetAppKey"] = forged_app_key(lambda _body: json.dumps(
        {"k256_key": genuine_app_key.k256_key.hex(), "k256_signature": signature.hex()}).encode())
    with pytest.raises(KmsAnswerInvalid, match="not issued by the pinned KMS root|signature is malformed"):
        kms.app_key()


def test_another_apps_genuine_app_key_is_refused(kms, genuine_app_key, other_app):
    """Another study's CVM got its key from the same KMS, signed by the same root; relayed to this CVM, the
    signature binds the other app_id, so it does not recover to the root for this one."""
    other_id, other_key = other_app
    assert other_id != kms.app_id and other_key.k256_key != genuine_app_key.k256_key
    kms.proxy.rules["GetAppKey"] = forged_app_key(lambda _body: json.dumps(
        {"k256_key": other_key.k256_key.hex(), "k256_signature": other_key.k256_signature.hex()}).encode())
    with pytest.raises(KmsAnswerInvalid, match="not issued by the pinned KMS root"):
        kms.app_key()


def test_an_app_key_issued_by_an_impostor_root_is_refused(kms):
    def content(_body):
        key = os.urandom(32)
        public = eth_keys.PrivateKey(key).public_key.to_compressed_bytes()
        signature = IMPOSTOR_ROOT.sign_msg_hash(app_key_issued_digest(kms.app_id, public)).to_bytes()
        return json.dumps({"k256_key": key.hex(), "k256_signature": signature.hex()}).encode()

    kms.proxy.rules["GetAppKey"] = forged_app_key(content)
    with pytest.raises(KmsAnswerInvalid, match="not issued by the pinned KMS root"):
        kms.app_key()


@pytest.mark.parametrize("part", ["ciphertext", "iv", "kms_ephemeral_pub"])
def test_an_app_key_box_altered_on_the_way_does_not_open(kms, part):
    kms.proxy.rules["GetAppKey"] = edit_answer(lambda answer, _body: answer["box"].update(
        {part: flip_hex(answer["box"][part], 5)}))
    with pytest.raises(KmsAnswerInvalid, match="could not be opened"):
        kms.app_key()


def test_an_app_key_box_sealed_to_another_key_does_not_open(kms, genuine_app_key):
    """The genuine key and signature, but sealed to another X25519 key than the one this CVM bound in its quote."""
    stranger = raw_public(X25519PrivateKey.generate()).hex()
    genuine = json.dumps({"k256_key": genuine_app_key.k256_key.hex(),
                          "k256_signature": genuine_app_key.k256_signature.hex()}).encode()

    def rule(body, forward):
        answer = forward(body).json()
        answer["box"] = sealed_to_caller({**body, "ephemeral_pubkey": stranger}, genuine)
        return 200, json.dumps(answer).encode()

    kms.proxy.rules["GetAppKey"] = rule
    with pytest.raises(KmsAnswerInvalid, match="could not be opened"):
        kms.app_key()


@pytest.mark.parametrize("plaintext", [
    b"not json",
    b'{"k256_signature": "00"}',
    b'{"k256_key": "zz", "k256_signature": "00"}',
    b"[1, 2]",
], ids=["not-json", "no-key", "not-hex", "not-an-object"])
def test_an_app_key_box_that_opens_to_something_else_is_refused(kms, plaintext):
    kms.proxy.rules["GetAppKey"] = forged_app_key(lambda _body: plaintext)
    with pytest.raises(KmsAnswerInvalid, match="does not hold an app key|Expecting value"):
        kms.app_key()


# ---------------------------------------------------------------------------------- owner keys


def test_the_genuine_owner_keys_are_accepted(kms):
    release = kms.owner_keys()
    assert sorted(release.keys) == sorted(kms.owners[n].address for n in "AB") and release.simulated


def test_an_owner_keys_box_altered_on_the_way_does_not_open(kms):
    kms.proxy.rules["ReleaseOwnerKeys"] = edit_answer(lambda answer, _body: answer["box"].update(
        ciphertext=flip_hex(answer["box"]["ciphertext"], 0)))
    with pytest.raises(KmsAnswerInvalid, match="could not be opened"):
        kms.owner_keys()


@pytest.mark.parametrize("plaintext", [
    b"not json",
    b'["0x0000000000000000000000000000000000000000"]',
    b'{"0x0000000000000000000000000000000000000000": "00"}',
    b'{"0x0000000000000000000000000000000000000000": "zz"}',
], ids=["not-json", "not-an-object", "short-key", "not-hex"])
def test_an_owner_keys_box_that_opens_to_something_else_is_refused(kms, plaintext):
    def rule(body, forward):
        answer = forward(body)
        assert answer.status_code == 200, answer.text
        return 200, json.dumps({**answer.json(), "box": sealed_to_caller(body["attestation"], plaintext)}).encode()

    kms.proxy.rules["ReleaseOwnerKeys"] = rule
    with pytest.raises(KmsAnswerInvalid, match="does not hold X25519 owner keys|Expecting value"):
        kms.owner_keys()


# ---------------------------------------------------------------------------------- transport


def test_an_http_error_is_a_kms_error_not_an_answer(kms):
    kms.proxy.rules["GetOwnerSealKey"] = lambda _body, _forward: (500, b'{"detail": "boom"}')
    with pytest.raises(KmsError, match="HTTP 500") as raised:
        kms.seal_key()
    assert type(raised.value) is KmsError


def test_a_refusal_carries_its_code_and_a_malformed_one_is_invalid(kms):
    refusal = {"error": "no budget left", "reason": "budget_exhausted"}
    kms.proxy.rules["GetOwnerSealKey"] = lambda _body, _forward: (403, json.dumps(refusal).encode())
    with pytest.raises(KmsRefused, match="no budget left") as refused:
        kms.seal_key()
    assert refused.value.code == "budget_exhausted"
    kms.proxy.rules["GetOwnerSealKey"] = lambda _body, _forward: (403, b'{"error": "x", "reason": "because"}')
    with pytest.raises(KmsAnswerInvalid, match="malformed GetOwnerSealKey answer"):
        kms.seal_key()


def test_a_malformed_answer_is_invalid_and_an_absent_kms_unreachable(kms):
    kms.proxy.rules["GetNonce"] = lambda _body, _forward: (200, b"<html>hello</html>")
    with pytest.raises(KmsAnswerInvalid, match="malformed GetNonce answer"):
        kms.app_key()
    with KmsClient(unused_loopback_url(), timeout_s=2) as absent, pytest.raises(KmsUnreachable, match="unreachable"):
        absent.owner_seal_key(kms.stack.description.dstack_app, kms.compose_hash, kms.owners["A"].address,
                              pinned_root_address=kms.root_address)


def unused_loopback_url() -> str:
    """A loopback URL on which nothing listens (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"
