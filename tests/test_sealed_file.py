"""Sealed-dataset format: round trips, what the envelope records, caller mistakes, what touches disk.

Tampering and every refusal of a damaged file live in test_sealed_file_tamper.py.
"""

from __future__ import annotations

import hashlib
import io
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_account import Account
from eth_keys import keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvm.sealed import dataset as _sealed_file
from cvm.sealed.dataset import (
    DEFAULT_CHUNK_SIZE,
    InputChangedWhileSealing,
    open_sealed,
    read_envelope,
    seal_file,
)
from cvm.sealed.source import CsvRowCounter, SchemaField
from cvm.sealed.stream import payload_length

APP_ID = bytes.fromhex("5a1e" * 10)
COMPOSE_HASH = hashlib.sha256(b"app-compose.json of the test study").digest()
KMS_ROOT = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"
NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
OWNER_KEY = keys.PrivateKey(hashlib.sha256(b"test owner key").digest())
SEAL_KEY = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"test owner sealing key").digest())

CSV_TEXT = (
    "patient_id,age,weight_kg,note\n"
    '1001,34,71.5,"plain"\n'
    '1002,58,80.25,"comma, inside"\n'
    '1003,41,66.0,"quote ""inside"" here"\n'
    '1004,29,59.75,"line one\nline two"\n'
    "1005,63,90.0,tail-without-quotes\n"
)


def seal(source: Path, out: Path, **overrides: object) -> _sealed_file.SealSummary:
    arguments: dict[str, object] = dict(
        app_id=APP_ID,
        compose_hash=COMPOSE_HASH,
        owner_key=OWNER_KEY,
        owner_seal_pubkey=SEAL_KEY.public_key(),
        kms_root_address=KMS_ROOT,
        now=NOW,
    )
    arguments.update(overrides)
    return seal_file(source, out, **arguments)  # type: ignore[arg-type]


def open_for_test_recipe(sealed: Path | io.BytesIO) -> _sealed_file.OpenedDataset:
    return open_sealed(sealed, SEAL_KEY, expected_app_id=APP_ID, expected_compose_hash=COMPOSE_HASH)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "cohort.csv"
    path.write_bytes(CSV_TEXT.encode())
    return path


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    table = pa.table(
        {
            "age": pa.array([34, 58, 41, 29, 63], pa.int32()),
            "weight_kg": [71.5, 80.25, 66.0, 59.75, 90.0],
            "smoker": [False, True, False, False, True],
            "site": ["a", "b", "a", "c", "b"],
        }
    )
    path = tmp_path / "cohort.parquet"
    pq.write_table(table, path, row_group_size=2)
    return path


def test_module_exports_exactly_the_public_surface() -> None:
    assert set(_sealed_file.__all__) == {
        "DEFAULT_CHUNK_SIZE", "DecryptionFailed", "Envelope", "EnvelopeHeader", "EnvelopeSignatureInvalid",
        "InputChangedWhileSealing", "MalformedSealedFile", "OpenedDataset", "SealSummary", "SealedFileError",
        "SealedForAnotherRecipe", "UnsupportedFormatVersion", "open_sealed", "read_envelope", "seal_file",
    }  # fmt: skip
    assert all(hasattr(_sealed_file, name) for name in _sealed_file.__all__)


@pytest.mark.parametrize(
    "chunk_size", [1, 7, 64, len(CSV_TEXT) - 1, len(CSV_TEXT), len(CSV_TEXT) + 1, DEFAULT_CHUNK_SIZE]
)
def test_csv_round_trip_returns_the_exact_bytes(csv_file: Path, tmp_path: Path, chunk_size: int) -> None:
    summary = seal(csv_file, tmp_path / "cohort.sealed", chunk_size=chunk_size)
    opened = open_for_test_recipe(summary.out_path)
    assert bytes(opened.plaintext) == csv_file.read_bytes()
    assert opened.envelope.header.chunk_count == -(-len(CSV_TEXT) // chunk_size)


def test_csv_envelope_records_schema_rows_and_binding(csv_file: Path, tmp_path: Path) -> None:
    summary = seal(csv_file, tmp_path / "cohort.sealed", chunk_size=64)
    envelope = read_envelope(summary.out_path)
    header = envelope.header
    assert (header.app_id, header.compose_hash, header.owner) == (
        APP_ID, COMPOSE_HASH, OWNER_KEY.public_key.to_canonical_address(),
    )  # fmt: skip
    assert header.kms_root == bytes.fromhex(KMS_ROOT[2:])
    assert header.source_format == "csv"
    assert header.schema == (
        SchemaField("patient_id", "int64"), SchemaField("age", "int64"),
        SchemaField("weight_kg", "double"), SchemaField("note", "string"),
    )  # fmt: skip
    assert envelope.rows == summary.rows == 5 == pcsv.read_csv(csv_file).num_rows
    assert header.plaintext_bytes == summary.plaintext_bytes == len(CSV_TEXT)
    assert (header.chunk_size, header.created_at) == (64, NOW)
    assert summary.envelope_digest == envelope.digest


def test_summary_digest_is_sha256_of_the_stored_payload(csv_file: Path, tmp_path: Path) -> None:
    summary = seal(csv_file, tmp_path / "cohort.sealed", chunk_size=16)
    envelope = read_envelope(summary.out_path)
    stored = summary.out_path.read_bytes()
    payload = stored[envelope.payload_offset : envelope.payload_offset + payload_length(len(CSV_TEXT), 16)]
    assert summary.ciphertext_sha256 == envelope.ciphertext_sha256 == hashlib.sha256(payload).digest()
    assert stored.startswith(b"sealroom.sealed/v1\n")


def test_parquet_round_trip_uses_footer_schema_and_rows(parquet_file: Path, tmp_path: Path) -> None:
    summary = seal(parquet_file, tmp_path / "cohort.sealed", chunk_size=100)
    envelope = read_envelope(summary.out_path)
    assert envelope.header.source_format == "parquet"
    assert envelope.header.schema == (
        SchemaField("age", "int32"), SchemaField("weight_kg", "double"),
        SchemaField("smoker", "bool"), SchemaField("site", "string"),
    )  # fmt: skip
    assert envelope.rows == 5
    opened = open_for_test_recipe(summary.out_path)
    assert bytes(opened.plaintext) == parquet_file.read_bytes()
    assert opened.to_arrow().equals(pq.read_table(parquet_file))
    assert opened.to_arrow(["site"]).column_names == ["site"]


def test_non_ascii_column_names_survive_the_canonical_envelope(tmp_path: Path) -> None:
    source = tmp_path / "unicode.csv"
    source.write_text("größe,名前\n1,a\n", encoding="utf-8")
    envelope = read_envelope(seal(source, tmp_path / "u.sealed").out_path)
    assert [field.name for field in envelope.header.schema] == ["größe", "名前"]


def test_csv_to_arrow_parses_like_pyarrow(csv_file: Path, tmp_path: Path) -> None:
    opened = open_for_test_recipe(seal(csv_file, tmp_path / "c.sealed", chunk_size=32).out_path)
    assert opened.to_arrow().equals(pcsv.read_csv(csv_file))
    assert opened.to_arrow(["age", "note"]).column_names == ["age", "note"]


def test_to_numpy_and_to_torch_stack_numeric_columns(parquet_file: Path, tmp_path: Path) -> None:
    opened = open_for_test_recipe(seal(parquet_file, tmp_path / "p.sealed").out_path)
    array = opened.to_numpy(["age", "weight_kg", "smoker"])
    assert array.shape == (5, 3) and array.dtype == np.float64
    assert array[1].tolist() == [58.0, 80.25, 1.0]
    tensor = opened.to_torch(["age"])
    assert tensor.dtype == torch.int32 and tensor[:, 0].tolist() == [34, 58, 41, 29, 63]
    with pytest.raises(ValueError, match="'site' has type string"):
        opened.to_numpy()


def test_to_numpy_refuses_nulls(tmp_path: Path) -> None:
    source = tmp_path / "gaps.csv"
    source.write_text("a,b\n1,2\n,3\n")
    opened = open_for_test_recipe(seal(source, tmp_path / "g.sealed").out_path)
    assert opened.to_numpy(["b"]).tolist() == [[2], [3]]
    with pytest.raises(ValueError, match="'a' has nulls"):
        opened.to_numpy(["a"])


def test_open_accepts_a_seekable_file_object(csv_file: Path, tmp_path: Path) -> None:
    sealed = seal(csv_file, tmp_path / "c.sealed").out_path
    assert bytes(open_for_test_recipe(io.BytesIO(sealed.read_bytes())).plaintext) == CSV_TEXT.encode()
    with sealed.open("rb") as handle:
        assert read_envelope(handle).rows == 5


def test_same_randomness_and_clock_give_the_same_file(csv_file: Path, tmp_path: Path) -> None:
    def fixed_rng(n: int) -> bytes:
        return hashlib.shake_256(b"test rng %d" % n).digest(n)

    first = seal(csv_file, tmp_path / "1.sealed", rng=fixed_rng).out_path.read_bytes()
    second = seal(csv_file, tmp_path / "2.sealed", rng=fixed_rng).out_path.read_bytes()
    assert first == second


def test_default_randomness_gives_a_fresh_data_key_each_time(csv_file: Path, tmp_path: Path) -> None:
    first = read_envelope(seal(csv_file, tmp_path / "1.sealed").out_path)
    second = read_envelope(seal(csv_file, tmp_path / "2.sealed").out_path)
    assert first.wrapped_key.ephemeral_public_key != second.wrapped_key.ephemeral_public_key
    assert first.ciphertext_sha256 != second.ciphertext_sha256


def test_default_clock_records_the_current_utc_second(csv_file: Path, tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    created = read_envelope(seal(csv_file, tmp_path / "c.sealed", now=None).out_path).header.created_at
    assert before <= created <= datetime.now(UTC)


def test_aware_clock_in_another_zone_is_recorded_in_utc(csv_file: Path, tmp_path: Path) -> None:
    local = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert read_envelope(seal(csv_file, tmp_path / "c.sealed", now=local).out_path).header.created_at == NOW


# --- caller mistakes: one negative test per parameter -------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"app_id": APP_ID.hex()}, TypeError, "app_id must be bytes"),
        ({"app_id": APP_ID[:19]}, ValueError, "app_id must be 20 bytes"),
        ({"compose_hash": COMPOSE_HASH + b"\x00"}, ValueError, "compose_hash must be 32 bytes"),
        ({"owner_key": Account.from_key(OWNER_KEY.to_bytes())}, TypeError, "owner_key must be an eth_keys"),
        ({"owner_seal_pubkey": SEAL_KEY}, TypeError, "owner_seal_pubkey must be"),
        ({"owner_seal_pubkey": SEAL_KEY.public_key().public_bytes_raw()}, TypeError, "X25519PublicKey"),
        ({"kms_root_address": KMS_ROOT.lower().replace("ba1f", "BA1F")}, ValueError, "kms_root_address"),
        ({"kms_root_address": "0x1234"}, ValueError, "kms_root_address"),
        ({"kms_root_address": KMS_ROOT[2:]}, ValueError, "kms_root_address must be a 0x-prefixed"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": (64 << 20) + 1}, ValueError, "chunk_size"),
        ({"chunk_size": True}, ValueError, "chunk_size"),
        ({"rng": lambda n: bytes(n - 1)}, ValueError, r"rng\(32\) must return 32 bytes"),
        ({"now": datetime(2026, 1, 1)}, ValueError, "timezone-aware"),
    ],
)
def test_seal_file_rejects_bad_arguments(
    csv_file: Path, tmp_path: Path, overrides: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        seal(csv_file, tmp_path / "out.sealed", **overrides)
    assert not (tmp_path / "out.sealed").exists()


def test_seal_file_refuses_to_overwrite_its_input(csv_file: Path) -> None:
    with pytest.raises(ValueError, match="must not be the input"):
        seal(csv_file, csv_file)
    assert csv_file.read_text() == CSV_TEXT


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b"", "CSV"), (b"id,name\n1,SECRET-NAME,extra\n", "CSV"), (b"PAR1 SECRET-NAME not parquet PAR1", "Parquet")],
)
def test_unreadable_input_is_a_value_error_that_quotes_no_data(tmp_path: Path, content: bytes, kind: str) -> None:
    source = tmp_path / "input"
    source.write_bytes(content)
    with pytest.raises(ValueError, match=f"not a {kind} file") as raised:
        seal(source, tmp_path / "out.sealed")
    assert "SECRET" not in str(raised.value) and raised.value.__cause__ is None
    assert sorted(os.listdir(tmp_path)) == ["input"]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"owner_seal_private_key": SEAL_KEY.public_key()}, TypeError),
        ({"expected_app_id": APP_ID[:10]}, ValueError),
        ({"expected_compose_hash": COMPOSE_HASH.hex()}, TypeError),
    ],
)
def test_open_sealed_rejects_bad_arguments(
    csv_file: Path, tmp_path: Path, overrides: dict[str, object], error: type[Exception]
) -> None:
    sealed = seal(csv_file, tmp_path / "c.sealed").out_path
    arguments: dict[str, object] = dict(
        owner_seal_private_key=SEAL_KEY, expected_app_id=APP_ID, expected_compose_hash=COMPOSE_HASH
    )
    arguments.update(overrides)
    with pytest.raises(error):
        open_sealed(sealed, **arguments)  # type: ignore[arg-type]


def test_open_sealed_needs_a_seekable_binary_source(csv_file: Path, tmp_path: Path) -> None:
    sealed = seal(csv_file, tmp_path / "c.sealed").out_path
    read_end, write_end = os.pipe()
    os.close(write_end)
    with open(read_end, "rb") as pipe, pytest.raises(ValueError, match="seekable"):
        open_for_test_recipe(pipe)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path or a binary file"):
        open_for_test_recipe(sealed.read_bytes())  # type: ignore[arg-type]


# --- nothing but the sealed file reaches disk --------------------------------------------------------


def test_a_seal_that_fails_midway_leaves_no_file_and_keeps_an_existing_one(csv_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "cohort.sealed"
    previous.write_bytes(b"an earlier sealed file")

    chunks_seen: list[int] = []

    def fail_on_third_chunk(size: int) -> None:
        chunks_seen.append(size)
        if len(chunks_seen) == 3:
            raise RuntimeError("owner pressed ctrl-c")

    with pytest.raises(RuntimeError, match="ctrl-c"):
        seal(csv_file, previous, chunk_size=16, progress=fail_on_third_chunk)
    assert os.listdir(out_dir) == ["cohort.sealed"]
    assert previous.read_bytes() == b"an earlier sealed file"


@pytest.mark.parametrize(("change", "message"), [("grow", "grew"), ("shrink", "shrank")])
def test_an_input_changed_during_sealing_is_refused_and_nothing_written(
    csv_file: Path, tmp_path: Path, change: str, message: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def change_input(done: int) -> None:
        with csv_file.open("ab" if change == "grow" else "r+b") as handle:
            if change == "grow":
                handle.write(b"1006,1,1.0,late\n")
            else:
                handle.truncate(20)

    with pytest.raises(InputChangedWhileSealing, match=message):
        seal(csv_file, out_dir / "c.sealed", chunk_size=16, progress=change_input)
    assert os.listdir(out_dir) == []


def test_progress_reports_every_plaintext_byte(csv_file: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    seal(csv_file, tmp_path / "c.sealed", chunk_size=40, progress=seen.append)
    assert sum(seen) == len(CSV_TEXT) and max(seen) == 40


def test_no_plaintext_or_key_material_in_the_output_directory(tmp_path: Path) -> None:
    source_dir, out_dir = tmp_path / "in", tmp_path / "out"
    source_dir.mkdir()
    out_dir.mkdir()
    body = "".join(f"{i},token-{hashlib.sha256(str(i).encode()).hexdigest()[:24]}\n" for i in range(200))
    source = source_dir / "secret.csv"
    source.write_text("id,token\n" + body)
    drawn: list[bytes] = []

    def recording_rng(n: int) -> bytes:
        drawn.append(os.urandom(n))
        return drawn[-1]

    seal(source, out_dir / "secret.sealed", chunk_size=256, rng=recording_rng)
    data_key, ephemeral_private, _wrap_nonce = drawn  # the wrap nonce is public by design
    secrets = [data_key, ephemeral_private, SEAL_KEY.private_bytes_raw(), OWNER_KEY.to_bytes()]
    window = 12
    needles = [body.encode()[i : i + window] for i in range(len(body) - window)]
    needles += [form for secret in secrets for form in (secret, secret.hex().encode())]
    for path in out_dir.iterdir():
        stored = path.read_bytes()
        leaked = [needle for needle in needles if needle in stored]
        assert leaked == [], f"{path.name} contains plaintext or key material"
    assert os.listdir(out_dir) == ["secret.sealed"]


# --- CSV row counting -----------------------------------------------------------------------------


def count_rows(data: bytes, chunk_size: int) -> int:
    counter = CsvRowCounter()
    for start in range(0, len(data), chunk_size):
        counter.feed(bytearray(data[start : start + chunk_size]))
    return counter.rows


@pytest.mark.parametrize(
    "data",
    [
        CSV_TEXT.encode(),
        b"a,b\r\n1,2\r\n3,4\r\n",  # CRLF
        b"a,b\n1,2\n3,4",  # no final newline
        b'a,b\n"x\n\n""y""\n",2\n"",3\n',  # blank lines and doubled quotes inside a quoted field
        b'a\n"""quoted start"""\n"end ""\n"""\n',
        b"a,b\n",  # header only
    ],
)
def test_csv_row_counter_agrees_with_pyarrow_at_every_chunk_split(data: bytes) -> None:
    expected = pcsv.read_csv(io.BytesIO(data)).num_rows
    assert {count_rows(data, size) for size in range(1, len(data) + 1)} == {expected}


def test_csv_row_counter_counts_blank_lines_as_documented() -> None:
    data = b"a,b\n1,2\n\n3,4\n"
    assert pcsv.read_csv(io.BytesIO(data)).num_rows == 2  # pyarrow skips the blank line ...
    assert count_rows(data, 5) == 3  # ... the counter counts every record end outside quotes


cells = st.text(alphabet=st.sampled_from('ab ,"\n\r\'x1'), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.tuples(cells, st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=30),
    chunk_size=st.integers(1, 64),
)
def test_csv_row_counter_matches_pyarrow_on_random_quoted_tables(rows: list[tuple[str, int]], chunk_size: int) -> None:
    table = pa.table({"text": [text for text, _ in rows], "number": [number for _, number in rows]})
    sink = io.BytesIO()
    pcsv.write_csv(table, sink)
    assert count_rows(sink.getvalue(), chunk_size) == len(rows)
