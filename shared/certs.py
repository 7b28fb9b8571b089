"""Certificates and site keys for a real consortium (the ``cryptography`` package).

Layout of the operator's certificate folder (``rectalfl certs init`` / ``add-site``)::

    certs/
      ca.crt, ca.key              the consortium's certificate authority (keep ca.key offline)
      server.crt, server.key      the SuperLink's TLS certificate, signed by the CA
      sites/<name>/site.key       a hospital's SuperNode authentication key (EC P-384, OpenSSH; give it
                                  to that hospital only)
      sites/<name>/site.pub       its public key in OpenSSH format (what the SuperLink registers)

Each hospital receives ``ca.crt`` (to check it talks to the real server) and its own ``site.key``.
TLS protects the traffic; the site key proves to the SuperLink which hospital connects (SuperNode
authentication: an unregistered key is refused).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertError(RuntimeError):
    """Something about the certificate folder is wrong; the message says what to do."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def init_ca(folder: Path, hosts: list[str] | None = None, *, days: int = 825, force: bool = False) -> dict[str, Path]:
    """Create the CA and the SuperLink's server certificate (valid for ``hosts`` + localhost).

    Raises
    ------
    CertError
        If ``folder`` already holds a CA and ``force`` is false (re-issuing would lock every site out).
    """
    folder = Path(folder)
    if (folder / "ca.crt").exists() and not force:
        raise CertError(f"{folder / 'ca.crt'} exists; every site trusts it. Use --force to replace it "
                        "(then send the new ca.crt to every site)")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rectalfl consortium"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "rectalfl consortium CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    names = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
           .sign(ca_key, hashes.SHA384()))
    out = {"ca_cert": folder / "ca.crt", "ca_key": folder / "ca.key", "server_cert": folder / "server.crt",
           "server_key": folder / "server.key"}
    _write(out["ca_key"], _key_pem(ca_key), private=True)
    _write(out["ca_cert"], ca.public_bytes(serialization.Encoding.PEM))
    _write(out["server_key"], _key_pem(srv_key), private=True)
    _write(out["server_cert"], srv.public_bytes(serialization.Encoding.PEM))
    return out


def add_site(folder: Path, name: str, *, force: bool = False) -> dict[str, Path]:
    """Create a hospital's SuperNode key pair under ``folder/sites/<name>/``."""
    if not SITE_NAME.match(name):
        raise CertError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (max 64), starting with a "
                        "letter or digit")
    folder = Path(folder)
    if not (folder / "ca.crt").is_file():
        raise CertError(f"{folder / 'ca.crt'} not found: run `rectalfl certs init --dir {folder}` first")
    d = folder / "sites" / name
    if (d / "site.key").exists() and not force:
        raise CertError(f"{d / 'site.key'} exists; use --force to issue a new key (then register it again "
                        "and give it to the site)")
    key = ec.generate_private_key(ec.SECP384R1())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out = {"key": d / "site.key", "pub": d / "site.pub"}
    # flower-supernode reads the private key in OpenSSH format
    _write(out["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), private=True)
    _write(out["pub"], pub + f" rectalfl-site-{name}\n".encode())
    return out


def site_public_keys(folder: Path) -> dict[str, Path]:
    """``{site name: public key file}`` for every site under ``folder/sites``."""
    return {p.parent.name: p for p in sorted((Path(folder) / "sites").glob("*/site.pub"))}


def check_server_files(folder: Path) -> dict[str, Path]:
    """The CA and server files the SuperLink needs, or a CertError naming what is missing."""
    folder = Path(folder)
    files = {"ca_cert": folder / "ca.crt", "server_cert": folder / "server.crt", "server_key": folder / "server.key"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise CertError(f"missing {', '.join(missing)}: run `rectalfl certs init --dir {folder}`")
    return files
