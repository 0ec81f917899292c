"""kms/root_store.py: root keys encrypted at rest; restart, wrong passphrase, tampering, unknown format, races."""

from __future__ import annotations

import json
import stat

import pytest

from kms import root_store
from kms.keys import RootKeys, generate_root_keys
from kms.root_store import ROOT_STORE_FILENAME, RootStoreError, load_or_create_root

PASSPHRASE = b"correct horse battery staple"


def counting_rng():
    """Deterministic stand-in for os.urandom: 0x01 0x02 0x03 … (the first 32 bytes are a valid k256 key)."""
    counter = iter(range(1, 10**6))
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


@pytest.fixture(scope="module")
def sealed_once(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("template")
    root = load_or_create_root(state_dir, PASSPHRASE)
    return (state_dir / ROOT_STORE_FILENAME).read_bytes(), root


@pytest.fixture
def sealed(tmp_path, sealed_once):
    """A state folder holding a root store (sealed once per module: scrypt is deliberately slow)."""
    data, root = sealed_once
    (tmp_path / ROOT_STORE_FILENAME).write_bytes(data)
    return tmp_path, root


def test_first_start_creates_a_private_sealed_file(tmp_path):
    state_dir = tmp_path / "fresh" / "state"
    root = load_or_create_root(state_dir, PASSPHRASE)
    path = state_dir / ROOT_STORE_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    document = json.loads(path.read_bytes())
    assert document["format"] == "sealroom-kms-root/v1"
    assert document["kdf"]["name"] == "scrypt" and document["cipher"]["name"] == "aes-256-gcm"
    data = path.read_bytes()
    for secret in (root.k256_private_bytes, root.derivation_secret):
        assert secret not in data and secret.hex().encode() not in data
    assert [p.name for p in state_dir.iterdir()] == [ROOT_STORE_FILENAME]  # no temporary file left behind


def test_restart_with_same_passphrase_returns_same_keys(sealed):
    state_dir, root = sealed
    before = (state_dir / ROOT_STORE_FILENAME).read_bytes()
    assert load_or_create_root(state_dir, PASSPHRASE) == root
    assert (state_dir / ROOT_STORE_FILENAME).read_bytes() == before


def test_randomness_is_injected(tmp_path):
    root = load_or_create_root(tmp_path, PASSPHRASE, rng=counting_rng())
    assert root == generate_root_keys(counting_rng())
    assert load_or_create_root(tmp_path, PASSPHRASE) == root


def test_wrong_passphrase_is_refused_and_the_file_kept(sealed):
    state_dir, _ = sealed
    before = (state_dir / ROOT_STORE_FILENAME).read_bytes()
    with pytest.raises(RootStoreError, match=r"^wrong passphrase or corrupted root store$"):
        load_or_create_root(state_dir, b"not the passphrase")
    assert (state_dir / ROOT_STORE_FILENAME).read_bytes() == before


def _flip_hex(value: str) -> str:
    return ("0" if value[0] != "0" else "1") + value[1:]


def _flip_last_byte(value: str) -> str:  # the GCM tag's last byte, XOR 0x01: always a change
    return value[:-2] + f"{int(value[-2:], 16) ^ 0x01:02x}"


TAMPERINGS = {
    "ciphertext byte": (lambda d: d.update(ciphertext=_flip_hex(d["ciphertext"])), r"corrupted root store$"),
    "tag byte": (lambda d: d.update(ciphertext=_flip_last_byte(d["ciphertext"])), r"corrupted root store$"),
    "truncated ciphertext": (lambda d: d.update(ciphertext=d["ciphertext"][:-34]), r"corrupted root store$"),
    "nonce": (lambda d: d["cipher"].update(nonce=_flip_hex(d["cipher"]["nonce"])), r"corrupted root store$"),
    "salt": (lambda d: d["kdf"].update(salt=_flip_hex(d["kdf"]["salt"])), r"corrupted root store$"),
    "scrypt n": (lambda d: d["kdf"].update(n=2**14), r"corrupted root store$"),
    "scrypt r": (lambda d: d["kdf"].update(r=4), r"corrupted root store$"),
    "huge scrypt n": (lambda d: d["kdf"].update(n=2**30), "scrypt parameters out of range"),
    "n not a power of two": (lambda d: d["kdf"].update(n=30000), "scrypt parameters out of range"),
    "n as a string": (lambda d: d["kdf"].update(n="32768"), "scrypt parameters out of range"),
    "other kdf": (lambda d: d["kdf"].update(name="pbkdf2"), "malformed fields"),
    "other cipher": (lambda d: d["cipher"].update(name="chacha20-poly1305"), "malformed fields"),
    "short nonce": (lambda d: d["cipher"].update(nonce="00" * 8), "malformed fields"),
    "bad hex": (lambda d: d.update(ciphertext="zz"), "malformed fields"),
    "missing kdf": (lambda d: d.pop("kdf"), "malformed fields"),
    "extra field": (lambda d: d.update(note="hi"), "malformed fields"),
    "unknown version": (lambda d: d.update(format="sealroom-kms-root/v2"), "unsupported root store format"),
    "no format": (lambda d: d.pop("format"), "not a root store document"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampered_file_is_refused_and_kept(sealed, name):
    state_dir, _ = sealed
    path = state_dir / ROOT_STORE_FILENAME
    document = json.loads(path.read_bytes())
    mutate, match = TAMPERINGS[name]
    mutate(document)
    tampered = json.dumps(document).encode()
    path.write_bytes(tampered)
    with pytest.raises(RootStoreError, match=match):
        load_or_create_root(state_dir, PASSPHRASE)
    assert path.read_bytes() == tampered


@pytest.mark.parametrize(
    "content, match",
    [(b"", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1, 2]", "not a root store document")],
)
def test_unreadable_file_is_refused_and_kept(tmp_path, content, match):
    (tmp_path / ROOT_STORE_FILENAME).write_bytes(content)
    with pytest.raises(RootStoreError, match=match):
        load_or_create_root(tmp_path, PASSPHRASE)
    assert (tmp_path / ROOT_STORE_FILENAME).read_bytes() == content


def test_concurrent_first_start_keeps_the_root_that_won(tmp_path, monkeypatch):
    # Another process creates the root between our existence check and our write: we must load its root,
    # not replace it with ours.
    winner = {}
    real_generate = root_store.generate_root_keys

    def generate_while_another_process_wins(rng):
        monkeypatch.setattr(root_store, "generate_root_keys", real_generate)  # the other process generates normally
        winner["root"] = load_or_create_root(tmp_path, PASSPHRASE, rng=counting_rng())
        return RootKeys(k256_private_bytes=b"\x09" * 32, derivation_secret=b"\x0a" * 32)

    monkeypatch.setattr(root_store, "generate_root_keys", generate_while_another_process_wins)
    loser = load_or_create_root(tmp_path, PASSPHRASE, rng=counting_rng())
    assert loser == winner["root"]
    assert loser.k256_private_bytes != b"\x09" * 32
    assert [p.name for p in tmp_path.iterdir()] == [ROOT_STORE_FILENAME]


def test_caller_mistakes(tmp_path):
    with pytest.raises(ValueError, match="must not be empty"):
        load_or_create_root(tmp_path, b"")
    with pytest.raises(TypeError, match="must be bytes"):
        load_or_create_root(tmp_path, "text passphrase")
    assert not (tmp_path / ROOT_STORE_FILENAME).exists()


def test_public_surface():
    assert set(root_store.__all__) == {"ROOT_STORE_FORMAT", "ROOT_STORE_FILENAME", "RootStoreError",
                                       "load_or_create_root"}
