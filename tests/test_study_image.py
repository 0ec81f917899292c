"""The study image (compose/image): reproducible bit for bit, pinned inputs only, and the digest recipes may name.

The builds here use the shared download and layer cache (``~/.cache/sealroom`` or ``$SEALROOM_CACHE``); the first
run on a machine fetches the pinned .debs and wheels into it. The reproducibility test rebuilds every layer from
the verified inputs (no layer cache) in another folder from another copy of the sources.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from compose.image import (
    PLACEHOLDER_DIGEST,
    ImageAllowlist,
    ImageNotBuilt,
    StaleImage,
    app_sources,
    build_study_image,
    current_study_image,
    current_study_image_digest,
    image_allowed,
    oci_archive,
    read_build_record,
)
from compose.image.build import APP_PACKAGES, default_image_dir
from compose.image.layers import Tree, write_layer
from compose.image.locks import read_debian_lock, read_python_lock

ROOT = Path(__file__).resolve().parent.parent
quiet = lambda message: None  # noqa: E731


def copy_sources(target: Path) -> Path:
    """The packages the image's code comes from, copied to another folder (no caches, no .git)."""
    for package in APP_PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build of this checkout (layers from the cache where they are there), as an operator would run it."""
    state = tmp_path_factory.mktemp("state")
    record = build_study_image(default_image_dir(state), log=quiet)
    return state, record


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def test_two_builds_in_different_folders_give_the_same_digest(built, tmp_path):
    _, first = built
    sources = copy_sources(tmp_path / "elsewhere")
    second = build_study_image(tmp_path / "out", root=sources, layer_cache=False, log=quiet)
    assert second.digest == first.digest and second.config_digest == first.config_digest
    assert [layer["from_cache"] for layer in second.document["layers"]] == [False, False, False, False]
    assert [layer["name"] for layer in second.document["layers"]] == ["base", "python", "bytecode", "app"]
    for layer in first.document["layers"]:       # every blob bit for bit, not only the manifest
        assert blob(first.layout, layer["digest"]) == blob(second.layout, layer["digest"]) or pytest.fail(layer)


def test_a_one_byte_change_to_the_cvm_code_changes_the_digest(built, tmp_path):
    _, first = built
    sources = copy_sources(tmp_path / "changed")
    run = sources / "cvm" / "run.py"
    run.write_bytes(run.read_bytes() + b" ")
    changed = build_study_image(tmp_path / "out", root=sources, log=quiet)
    assert changed.digest != first.digest
    before, after = first.document["layers"], changed.document["layers"]
    # base, wheels and their bytecode: the same; the app layer (code and its bytecode) differs
    assert [b["digest"] for b in before[:3]] == [a["digest"] for a in after[:3]]
    assert before[3]["digest"] != after[3]["digest"]


def test_the_layout_is_a_valid_oci_image_that_names_its_inputs(built):
    state, record = built
    layout = record.layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["digest"] == record.digest
    manifest_bytes = blob(layout, record.digest)
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == record.digest
    manifest = json.loads(manifest_bytes)
    config_bytes = blob(layout, manifest["config"]["digest"])
    assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == record.config_digest
    config = json.loads(config_bytes)
    assert config["config"]["User"] == "10001:10001"
    assert "PYTHONDONTWRITEBYTECODE=1" in config["config"]["Env"]
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    for layer in manifest["layers"]:
        assert layer["size"] == len(blob(layout, layer["digest"]))
    saved = read_build_record(default_image_dir(state))
    assert saved["digest"] == record.digest and saved["reference"] == f"sealroom/study-runner@{record.digest}"
    inputs = saved["inputs"]
    assert inputs["debian_packages"] == len(read_debian_lock()) and inputs["wheels"] == len(read_python_lock())
    assert inputs["source_date_epoch"] == 0


def test_the_layers_are_normalised_and_hold_no_tests_or_compiler_and_only_unchecked_hash_bytecode(built):
    _, record = built
    names: list[str] = []
    headers: dict[str, bytes] = {}
    for layer in record.document["layers"]:
        path = record.layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with tarfile.open(path) as archive:
            members = archive.getmembers()
            headers.update({m.name: archive.extractfile(m).read(16) for m in members if m.name.endswith(".pyc")})
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
        names += [m.name for m in members]
    app = [n for n in names if n.startswith("opt/sealroom/app/")]
    assert "opt/sealroom/app/cvm/run.py" in app and "opt/sealroom/app/contracts/artifacts/DstackApp.json" in app
    assert not [n for n in app if n.split("/")[3] in ("tests", "sealing_cli", "auditor")]
    assert "opt/sealroom/app/compose/api.py" not in app            # only what the entry points import
    # Bytecode: CPython 3.11's, unchecked-hash (PEP 552: flags 0b01, no mtime), each next to its source.
    assert not [n for n in names if n.endswith(".pyo")]
    assert "opt/sealroom/app/cvm/__pycache__/run.cpython-311.pyc" in headers
    assert "usr/lib/python3.11/__pycache__/os.cpython-311.pyc" in headers
    assert "usr/lib/python3/dist-packages/torch/__pycache__/__init__.cpython-311.pyc" in headers
    sources = set(names)
    for pyc, header in headers.items():
        folder, _, file = pyc.rpartition("/__pycache__/")
        module = file.removesuffix(".cpython-311.pyc")
        assert file.endswith(".cpython-311.pyc") and f"{folder}/{module}.py" in sources, pyc
        assert header[:4] == (3495).to_bytes(2, "little") + b"\r\n" and header[4:8] == b"\x01\0\0\0", pyc
    compilers = {"gcc", "cc", "c++", "g++", "clang", "tcc", "as", "ld", "cpp"}
    assert not [n for n in names if n.startswith(("usr/bin/", "bin/")) and n.rsplit("/", 1)[-1] in compilers]
    assert "usr/bin/python3.11" in names and "etc/passwd" in names


def test_bytecode_is_compiled_by_the_image_s_python_the_same_whatever_the_order(built):
    """The image's own CPython 3.11 (run from its base layer) compiles: the pyc names the path in the image, holds
    the source's hash (unchecked), and is the same bytes in any order; what does not compile gets no pyc."""
    import importlib.util
    import marshal

    from compose.image.bytecode import compile_bytecode

    _, record = built
    base = record.layout / "blobs" / "sha256" / record.document["layers"][0]["digest"].split(":", 1)[1]
    sources = {f"opt/probe/m{i}.py": f"X = {{'a', 'b', {i}}}\ndef f():\n    return X\n".encode() for i in range(12)}
    sources["opt/probe/broken.py"] = b"def (:\n"
    first = compile_bytecode(base, sources=sources)
    second = compile_bytecode(base, sources=dict(reversed(list(sources.items()))))
    assert first == second and "opt/probe/__pycache__/broken.cpython-311.pyc" not in first
    pyc = first["opt/probe/__pycache__/m3.cpython-311.pyc"]
    assert pyc[4:8] == b"\x01\0\0\0" and pyc[8:16] == importlib.util.source_hash(sources["opt/probe/m3.py"])
    assert marshal.loads(pyc[16:]).co_filename == "/opt/probe/m3.py"


def test_the_oci_archive_stream_is_a_tar_of_the_layout(built, tmp_path):
    _, record = built
    archive_path = tmp_path / "image.tar"
    with open(archive_path, "wb") as sink:
        for chunk in oci_archive(record.layout):
            sink.write(chunk)
    with tarfile.open(archive_path) as archive:
        names = archive.getnames()
        assert json.loads(archive.extractfile("index.json").read())["manifests"][0]["digest"] == record.digest
    assert f"blobs/sha256/{record.digest.split(':')[1]}" in names and "oci-layout" in names


def test_a_layer_is_the_same_bytes_whatever_the_order_things_were_added(tmp_path):
    one, two = Tree(), Tree()
    for tree, order in ((one, ["b/x", "a/y", "a"]), (two, ["a", "a/y", "b/x"])):
        for path in order:
            if path == "a":
                tree.add_dir(path)
            else:
                tree.add_bytes(path, path.encode(), 0o600)
    first, second = write_layer(one, tmp_path / "1.tar", epoch=5), write_layer(two, tmp_path / "2.tar", epoch=5)
    assert first == second and (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    with tarfile.open(tmp_path / "1.tar") as archive:
        assert {m.name: (m.mode, m.mtime) for m in archive.getmembers()}["a/y"] == (0o644, 5)


# --- the digest recipes pin, and which ones the API lets through -------------------------------------------------

def yaml_naming(image: str) -> str:
    return f"services:\n  study:\n    image: {image}\n    command: [python, -m, cvm.run]\n"


def test_the_current_study_image_is_the_built_one_and_goes_stale_with_the_code(built, tmp_path):
    state, record = built
    assert current_study_image(state) == record.reference
    assert current_study_image_digest(state) == record.digest
    sources = copy_sources(tmp_path / "edited")
    (sources / "cvm" / "labels.py").write_text((sources / "cvm" / "labels.py").read_text() + "\n# edited\n")
    with pytest.raises(StaleImage, match="app_tree_sha256 changed"):
        current_study_image(state, root=sources)
    with pytest.raises(ImageNotBuilt, match="seal image build"):
        current_study_image(tmp_path / "no-state")


def test_image_allowed_takes_only_the_built_digest(built):
    state, record = built
    assert image_allowed(yaml_naming(record.reference), state_dir=state) is None
    refusals = {
        "sealroom/study-runner:latest": "named by tag",
        "sealroom/study-runner": "named by tag",
        f"sealroom/study-runner:v1@{record.digest}": "tag as well as a digest",
        f"sealroom/study-runner@{PLACEHOLDER_DIGEST}": "placeholder",
        "sealroom/study-runner@sha256:" + "ab" * 32: "not an allowed study image digest",
        f"docker.io/library/python@{record.digest}": "only sealroom/study-runner images",
        "sealroom/study-runner@sha256:xyz": "not a sha256 digest",
    }
    for image, reason in refusals.items():
        assert reason in (image_allowed(yaml_naming(image), state_dir=state) or ""), image
    two = yaml_naming(record.reference) + "  sidecar:\n    image: busybox:latest\n"
    assert "sidecar" in image_allowed(two, state_dir=state)
    # An app-compose (as bytes or parsed) is read the same way, and an explicit allowlist replaces the record.
    app_compose = {"docker_compose_file": yaml_naming(record.reference)}
    assert image_allowed(json.dumps(app_compose).encode(), state_dir=state) is None
    assert "not an allowed" in image_allowed(app_compose, allowed=["sha256:" + "cd" * 32])
    assert "no study image digest is allowed here" in image_allowed(yaml_naming(record.reference),
                                                                     state_dir=state / "elsewhere")


def test_the_api_allowlist_reads_the_current_build_at_each_check_or_takes_explicit_digests(built, tmp_path):
    state, record = built
    later = ImageAllowlist(state_dir=tmp_path)
    assert "no study image is built" in later.refusal(yaml_naming(record.reference))
    (tmp_path / "study-image").mkdir()                 # a build appears while the API runs: it counts at once
    shutil.copy(state / "study-image" / "build-record.json", tmp_path / "study-image" / "build-record.json")
    assert later.refusal(yaml_naming(record.reference)) is None
    other = "sha256:" + "cd" * 32
    explicit = ImageAllowlist([other])
    assert explicit.refusal(yaml_naming(f"sealroom/study-runner@{other}")) is None
    assert f"{record.digest} is not an allowed study image digest (allowed here: {other})" in explicit.refusal(
        yaml_naming(record.reference))
    # Worded for the API: the compose's own values are not repeated.
    assert explicit.refusal(yaml_naming("sealroom/study-runner:v9"), echo=False) == (
        "service 1 of 1: its image is named by tag, not by digest; pin sealroom/study-runner@sha256:<digest>")
    for bad in ([PLACEHOLDER_DIGEST], ["latest"], ["sha256:" + "AB" * 32]):
        with pytest.raises(ValueError, match="not study image digests"):
            ImageAllowlist(bad)
    with pytest.raises(ValueError, match="needs digests or the state folder"):
        ImageAllowlist()


def test_the_base_has_the_runtime_libraries_the_wheels_link_against(built):
    """The wheels' extension modules need libc, libm, libgcc_s, libstdc++ and libz from the system and bundle
    the rest (checked on the installed wheels when the lock was made); the base has exactly those, and Python."""
    _, record = built
    base = record.layout / "blobs" / "sha256" / record.document["layers"][0]["digest"].split(":", 1)[1]
    with tarfile.open(base) as archive:
        names = {m.name.rsplit("/", 1)[-1] for m in archive.getmembers()}
    assert {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libstdc++.so.6", "libz.so.1", "ld-linux-x86-64.so.2",
            "python3.11", "libssl.so.3"} <= names


def test_app_sources_follow_the_entry_points_imports():
    files = app_sources()
    assert "opt/sealroom/app/compose/backends/inside.py" in files
    assert "opt/sealroom/app/kms_client/client.py" in files
    assert not [path for path in files if "/kms/" in path and "/kms_client/" not in path]   # the KMS stays out
