"""A development certificate chain for C2PA signing, made offline: a root CA and an ES256 signing
certificate it issues, as `chain.pem` (the signer's certificate, then the root's) and `key.pem`
(the signer's private key).

Why a chain and not one self-signed certificate: C2PA readers refuse a self-signed signer, and
want a certificate for digital signatures only (key usage `digitalSignature`, extended key usage
`emailProtection`, not a CA). A reader shows images signed with this chain as signed by an
untrusted party (`signingCredential.untrusted`), which is what a development chain is; a real one
comes from a certificate authority on the C2PA trust list (docs/provenance.md).

    python -m tools.make_c2pa_cert --out DIR
    C2PA_CERT=DIR/chain.pem C2PA_KEY=DIR/key.pem make run
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "imagegen development"


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def make_chain(days: int = 365) -> tuple[bytes, bytes]:
    """The chain (signer first) and the signer's key, both PEM."""
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(days=1)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = _name(f"{ORGANIZATION} root")
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=10 * days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # certificates and revocation lists only
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    signer = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{ORGANIZATION} signer"))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digital signatures only
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    chain = signer.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, private


def write_chain(folder: Path, days: int = 365) -> tuple[Path, Path]:
    """A new chain and key written into `folder`, the key readable by its owner alone: the paths to
    give as C2PA_CERT and C2PA_KEY."""
    chain, private = make_chain(days)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain.pem").write_bytes(chain)
    key_file = folder / "key.pem"
    key_file.unlink(missing_ok=True)
    with os.fdopen(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(private)
    return folder / "chain.pem", key_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the folder for chain.pem and key.pem")
    parser.add_argument("--days", type=int, default=365, help="how long the signing certificate is valid")
    args = parser.parse_args()
    chain, key = write_chain(args.out, args.days)
    print(f"C2PA_CERT={chain}\nC2PA_KEY={key}")


if __name__ == "__main__":
    main()
