"""SIMULATED TDX platform: the one thing this machine lacks is TDX hardware.

Quotes made here use the real v4 layout (:mod:`cvm.attest.tdx_quote`) and a real signature structure, but
every key is a simulation key generated on this machine, and the chain ends at a self-signed
"Sealroom SIMULATED TDX Root CA", never at Intel's root. :func:`cvm.attest.verify.verify_quote`
refuses them unless the caller opts in to simulation and pins this root.

What is simulated and how (so nothing is mistaken for a measurement of real hardware):

- PKI: root CA → "SIMULATED TDX PCK Platform CA" → "SIMULATED TDX PCK Certificate" (P-256, X.509),
  the shape of Intel's SGX root → platform CA → PCK chain; the PCK key signs the QE report.
- Quoting enclave: an attestation key (P-256) bound by the QE report's report_data
  (``sha256(attestation_key ‖ qe_auth_data) ‖ 32 zero bytes``), as DCAP specifies.
- The OS image: a :class:`SimulatedOsImage` is described the way a dstack OS release is, by its
  ``sha256sum.txt`` (simulated firmware, kernel, initrd, metadata with the kernel command line, rootfs);
  ``os_image_hash = sha256(sha256sum.txt)``, and MRTD and the RTMR0-2 boot events are computed from the listed
  digests (MRTD from the firmware, RTMR0 from the firmware configuration, RTMR1 from the kernel, RTMR2 from the
  command line and the initrd), so another image boots to other measurements. Its
  :meth:`~SimulatedOsImage.measurement_record` is what an operator registers (:mod:`cvm.attest.os_image`).
- TD measurements: the booted image's MRTD and RTMR0-2; RTMR3 is whatever the caller measured; header user_data
  says ``sealroom-simulated``.

The platform's private keys are stored in ``state_dir`` in a 0600 file; they are simulation keys,
not user secrets.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cvm.attest.eventlog import RuntimeEvent, replay_rtmr
from cvm.attest.os_image import OsMeasurement
from cvm.attest.tdx_quote import (
    ATTESTATION_KEY_TYPE_ECDSA_P256,
    TEE_TYPE_TDX,
    QuoteHeader,
    TdReport,
    assemble_quote,
    ecdsa_der_to_raw,
    encode_header,
    encode_qe_report,
    encode_td_report,
)

__all__ = [
    "SIMULATED_BOOT_EVENTS",
    "SIMULATED_DEVICE_ID",
    "SIMULATED_MRTD",
    "SIMULATED_OS_IMAGE",
    "SIMULATED_OS_IMAGE_HASH",
    "SIMULATED_QUOTE_USER_DATA",
    "SIMULATED_ROOT_CN",
    "SIMULATED_RTMR0",
    "SIMULATED_RTMR1",
    "SIMULATED_RTMR2",
    "SimulatedOsImage",
    "SimulatedTdx",
    "mr_config_id_v1",
]

SIMULATED_ROOT_CN = "Sealroom SIMULATED TDX Root CA"
_PLATFORM_CA_CN = "Sealroom SIMULATED TDX PCK Platform CA"
_PCK_CN = "Sealroom SIMULATED TDX PCK Certificate"

# EV_IPL-typed boot events for RTMR0-2, so an event-log replay of all four RTMRs (dstack-sdk's
# replay_rtmrs) reproduces the quote, as it does on real dstack.
_EV_IPL = 0x0000000D
# The files of a simulated image, as a dstack OS release's sha256sum.txt lists them, and which boot event measures
# them: (register, event label, files). The firmware also makes MRTD; the command line (metadata.json, which names
# the rootfs's dm-verity root) and the initrd go to RTMR2, as on dstack.
_FIRMWARE = "ovmf.fd"
_BOOT_EVENTS = ((0, "simulated-firmware-config", (_FIRMWARE,)), (1, "simulated-kernel", ("bzImage",)),
                (2, "simulated-initrd-cmdline", ("metadata.json", "initramfs.cpio.gz")))
_LISTED_FILES = frozenset({file for _, _, files in _BOOT_EVENTS for file in files} | {"rootfs.img.verity"})


@dataclass(frozen=True)
class SimulatedOsImage:
    """A SIMULATED dstack OS image, described by its ``sha256sum.txt``: one ``<sha256 hex>  <file>`` line per file
    (``ovmf.fd``, ``bzImage``, ``initramfs.cpio.gz``, ``metadata.json`` and ``rootfs.img.verity``), sorted by file
    name. Everything below is computed from that text, so changing one file's digest changes the image hash and the
    register that file is measured into."""

    name: str
    version: str
    sha256sum: str

    def __post_init__(self) -> None:
        listed = self.file_digests
        if set(listed) != _LISTED_FILES:
            raise ValueError(f"a simulated OS image lists exactly {', '.join(sorted(_LISTED_FILES))}")

    @classmethod
    def describe(cls, name: str, version: str, files: dict[str, bytes]) -> SimulatedOsImage:
        """The image whose files have these contents (simulated: a few labelled bytes each)."""
        lines = "".join(f"{hashlib.sha256(files[file]).hexdigest()}  {file}\n" for file in sorted(files))
        return cls(name=name, version=version, sha256sum=lines)

    @property
    def file_digests(self) -> dict[str, bytes]:
        digests: dict[str, bytes] = {}
        for line in self.sha256sum.splitlines():
            digest, _, file = line.partition("  ")
            if len(digest) != 64 or not file or file in digests:
                raise ValueError(f"not a sha256sum.txt line: {line!r}")
            digests[file] = bytes.fromhex(digest)
        return digests

    @property
    def os_image_hash(self) -> bytes:
        """dstack's: ``sha256(sha256sum.txt)``."""
        return hashlib.sha256(self.sha256sum.encode()).digest()

    @property
    def mrtd(self) -> bytes:
        return hashlib.sha384(b"sealroom simulated TDX MRTD:" + self.file_digests[_FIRMWARE]).digest()

    @property
    def boot_events(self) -> tuple[RuntimeEvent, ...]:
        """The RTMR0-2 event-log entries, one per register: digest ``sha384(label ‖ ":" ‖ the files' sha256s)``."""
        digests = self.file_digests
        return tuple(
            RuntimeEvent(name=label, payload=b"", imr=imr, event_type=_EV_IPL,
                         digest=hashlib.sha384(label.encode() + b":" + b"".join(digests[f] for f in files)).digest())
            for imr, label, files in _BOOT_EVENTS
        )

    def rtmr(self, index: int) -> bytes:
        return replay_rtmr(e.digest for e in self.boot_events if e.imr == index)

    def measurement_record(self) -> OsMeasurement:
        """This image's measurement record, as an operator registers it with the KMS (:mod:`cvm.attest.os_image`)."""
        return OsMeasurement(
            name=self.name, version=self.version, os_image_hash=self.os_image_hash, mrtd=self.mrtd,
            rtmr0=self.rtmr(0), rtmr1=self.rtmr(1), rtmr2=self.rtmr(2), sha256sum=self.sha256sum,
            source="SIMULATED: computed from the simulated image's sha256sum.txt by cvm.attest.simulated "
                   "(proves nothing about hardware)",
        )


SIMULATED_OS_IMAGE = SimulatedOsImage.describe("sealroom-simulated-dstack-os", "0.5.4-sim", {
    _FIRMWARE: b"sealroom simulated TDX virtual firmware (OVMF)",
    "bzImage": b"sealroom simulated dstack kernel",
    "initramfs.cpio.gz": b"sealroom simulated dstack initramfs",
    "metadata.json": b'{"cmdline":"console=ttyS0 sealroom-simulated dstack.rootfs_hash=simulated"}',
    "rootfs.img.verity": b"sealroom simulated dstack rootfs (dm-verity)",
})
SIMULATED_BOOT_EVENTS = SIMULATED_OS_IMAGE.boot_events
SIMULATED_MRTD = SIMULATED_OS_IMAGE.mrtd
SIMULATED_RTMR0, SIMULATED_RTMR1, SIMULATED_RTMR2 = (SIMULATED_OS_IMAGE.rtmr(index) for index in range(3))
SIMULATED_OS_IMAGE_HASH = SIMULATED_OS_IMAGE.os_image_hash
SIMULATED_DEVICE_ID = hashlib.sha256(b"sealroom-simulated-device").digest()
SIMULATED_QUOTE_USER_DATA = b"sealroom-simulated".ljust(20, b"\0")

_INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_SIMULATED_QE_MR_ENCLAVE = hashlib.sha256(b"sealroom simulated QE enclave").digest()
_SIMULATED_QE_MR_SIGNER = hashlib.sha256(b"sealroom simulated QE signer").digest()
_CERT_LIFETIME = datetime.timedelta(days=3650)

_KEYS_FILE = "simulated-tdx-keys.pem"
_CERTS_FILE = "simulated-tdx-certs.pem"


def mr_config_id_v1(compose_hash: bytes) -> bytes:
    """dstack MRCONFIGID V1 (``dstack-types/src/mr_config.rs``): ``0x01 ‖ compose_hash ‖ zero pad`` (48 bytes)."""
    if len(compose_hash) != 32:
        raise ValueError("compose_hash is 32 bytes")
    return (b"\x01" + compose_hash).ljust(48, b"\0")


@dataclass(frozen=True)
class SimulatedTdx:
    """A SIMULATED TDX host: its PKI and quoting key. Build with :meth:`load_or_create`."""

    root_cert: x509.Certificate
    platform_ca_cert: x509.Certificate
    pck_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str], *, now: int | None = None) -> SimulatedTdx:
        """Load the simulated platform from ``state_dir``, creating it on first use.

        ``now`` (unix seconds) dates the certificates of a new platform; default: the current time.
        """
        state = Path(state_dir)
        keys_path, certs_path = state / _KEYS_FILE, state / _CERTS_FILE
        if keys_path.exists() and certs_path.exists():
            return cls._load(keys_path, certs_path)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        platform = cls._generate(int(time.time()) if now is None else now)
        _write_private(keys_path, _private_pem(platform.pck_key) + _private_pem(platform.attestation_key))
        certs_path.write_bytes(platform.cert_chain_pem)
        return platform

    @classmethod
    def _generate(cls, now: int) -> SimulatedTdx:
        # The two CA keys sign once, here, and are then dropped: nothing needs to issue more.
        root_key, ca_key, pck_key, attestation_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
        not_before = datetime.datetime.fromtimestamp(now, datetime.timezone.utc) - datetime.timedelta(days=1)
        root = _certificate(SIMULATED_ROOT_CN, root_key.public_key(), SIMULATED_ROOT_CN, root_key, not_before, 1)
        platform_ca = _certificate(_PLATFORM_CA_CN, ca_key.public_key(), SIMULATED_ROOT_CN, root_key, not_before, 0)
        pck = _certificate(_PCK_CN, pck_key.public_key(), _PLATFORM_CA_CN, ca_key, not_before, None)
        return cls(root, platform_ca, pck, pck_key, attestation_key)

    @classmethod
    def _load(cls, keys_path: Path, certs_path: Path) -> SimulatedTdx:
        pck, platform_ca, root = x509.load_pem_x509_certificates(certs_path.read_bytes())
        pck_key, attestation_key = (
            serialization.load_pem_private_key(block, password=None) for block in _pem_blocks(keys_path.read_bytes())
        )
        if not isinstance(pck_key, ec.EllipticCurvePrivateKey) or not isinstance(
            attestation_key, ec.EllipticCurvePrivateKey
        ):
            raise ValueError(f"{keys_path} does not hold the simulated platform's P-256 keys")
        return cls(root, platform_ca, pck, pck_key, attestation_key)

    @property
    def cert_chain_pem(self) -> bytes:
        """PCK → platform CA → root, PEM, in the order a quote's type-5 certification data carries."""
        chain = (self.pck_cert, self.platform_ca_cert, self.root_cert)
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)

    @property
    def root_der(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    def simulated_root_fingerprint(self) -> bytes:
        """sha256 of the simulated root certificate's DER: what verifiers pin."""
        return hashlib.sha256(self.root_der).digest()

    def make_quote(
        self,
        report_data: bytes,
        *,
        rtmr3: bytes,
        mrtd: bytes = SIMULATED_MRTD,
        rtmr0: bytes = SIMULATED_RTMR0,
        rtmr1: bytes = SIMULATED_RTMR1,
        rtmr2: bytes = SIMULATED_RTMR2,
        mr_config_id: bytes = bytes(48),
        td_attributes: int = 0,
    ) -> bytes:
        """A SIMULATED TDX v4 quote over these measurements, signed through the simulated chain."""
        if not isinstance(report_data, bytes) or len(report_data) != 64:
            raise ValueError("report_data must be exactly 64 bytes")
        header = QuoteHeader(
            version=4,
            attestation_key_type=ATTESTATION_KEY_TYPE_ECDSA_P256,
            tee_type=TEE_TYPE_TDX,
            qe_svn=0,
            pce_svn=0,
            qe_vendor_id=_INTEL_QE_VENDOR_ID,
            user_data=SIMULATED_QUOTE_USER_DATA,
        )
        body = TdReport(
            tee_tcb_svn=bytes(16),
            mr_seam=hashlib.sha384(b"sealroom simulated TDX module").digest(),
            mr_signer_seam=bytes(48),
            seam_attributes=bytes(8),
            td_attributes=td_attributes.to_bytes(8, "little"),
            xfam=bytes.fromhex("e702060000000000"),
            mrtd=mrtd,
            mr_config_id=mr_config_id,
            mr_owner=bytes(48),
            mr_owner_config=bytes(48),
            rtmr0=rtmr0,
            rtmr1=rtmr1,
            rtmr2=rtmr2,
            rtmr3=rtmr3,
            report_data=report_data,
        )
        signed_region = encode_header(header) + encode_td_report(body)
        attestation_key = _raw_public_key(self.attestation_key)
        qe_auth_data = hashlib.sha256(b"sealroom simulated QE auth data").digest()
        # DCAP binds the attestation key to the PCK-signed QE report through its report_data.
        qe_report = encode_qe_report(
            mr_enclave=_SIMULATED_QE_MR_ENCLAVE,
            mr_signer=_SIMULATED_QE_MR_SIGNER,
            report_data=hashlib.sha256(attestation_key + qe_auth_data).digest() + bytes(32),
        )
        return assemble_quote(
            signed_region,
            quote_signature=_sign(self.attestation_key, signed_region),
            attestation_key=attestation_key,
            qe_report=qe_report,
            qe_report_signature=_sign(self.pck_key, qe_report),
            qe_auth_data=qe_auth_data,
            pck_cert_chain_pem=self.cert_chain_pem,
        )


def _certificate(
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer_cn: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    path_length: int | None,
) -> x509.Certificate:
    """An X.509 certificate; ``path_length`` None makes a leaf, an int a CA with that path length."""
    is_ca = path_length is not None
    unused_usages = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    usage = dict.fromkeys((*unused_usages, "encipher_only", "decipher_only"), False)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name(issuer_cn))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=not is_ca, key_cert_sign=is_ca, crl_sign=is_ca, **usage), critical=True
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sealroom (SIMULATED, not Intel)"),
        ]
    )


def _sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return ecdsa_der_to_raw(key.sign(message, ec.ECDSA(hashes.SHA256())))


def _raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return point[1:]  # drop the 0x04 prefix: quotes carry x‖y


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def _pem_blocks(data: bytes) -> list[bytes]:
    end_marker = b"-----END PRIVATE KEY-----\n"
    return [block + end_marker for block in data.split(end_marker) if block.strip()]


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never follow or clobber something already there; 0600 from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
