"""Certificates and site keys for a real consortium (the ``cryptography`` package).

Layout of the operator's certificate folder (``rectalfl certs ...``)::

    certs/
      ca.crt, ca.key              the consortium's certificate authority (keep ca.key offline)
      server.crt, server.key      the SuperLink's TLS certificate, signed by the CA
      sites/<name>/site.key       a hospital's SuperNode authentication key (EC P-384, OpenSSH; give it
                                  to that hospital only)
      sites/<name>/site.pub       its public key in OpenSSH format (what the SuperLink registers)
      revoked.json                fingerprints of revoked site keys (never registered again)
      revoked/<name>-<time>/      the key files of a revoked or rotated site key

Each hospital receives ``ca.crt`` (to check it talks to the real server) and its own ``site.key``.
TLS protects the traffic; the site key proves to the SuperLink which hospital connects (SuperNode
authentication: an unregistered key is refused).

Private keys are created readable by their owner only from the first byte: each is written to a new
file opened with ``O_CREAT | O_EXCL`` and mode 0600, then renamed over the target (never a file that
is briefly world-readable).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
REVOKED_FILE = "revoked.json"


class CertError(RuntimeError):
    """Something about the certificate folder is wrong; the message says what to do."""


# --------------------------------------------------------------------------- files
def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``private`` files are mode 0600 from their first byte.

    The bytes go to a new sibling file created with ``O_CREAT | O_EXCL`` (never an existing file or a
    planted symlink) and mode 0600 (0644 for public files; the umask can only narrow it), which then
    replaces ``path`` in one rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- CA and server certificate
def init_ca(folder: Path, hosts: list[str] | None = None, *, days: int = 825, force: bool = False) -> dict[str, Path]:
    """Create the CA and the SuperLink's server certificate (valid for ``hosts`` + localhost).

    Raises
    ------
    CertError
        If ``folder`` already holds a CA and ``force`` is false (re-issuing would lock every site out).
    """
    folder = Path(folder)
    if (folder / "ca.crt").exists() and not force:
        raise CertError(f"{folder / 'ca.crt'} exists; every site trusts it. To add a host name or renew the "
                        f"server certificate keep the CA: `rectalfl certs renew-server --dir {folder} --host NAME`. "
                        "--force replaces the CA (then send the new ca.crt to every site)")
    now = _now()
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
    out = {"ca_cert": folder / "ca.crt", "ca_key": folder / "ca.key", "server_cert": folder / "server.crt",
           "server_key": folder / "server.key"}
    write_file(out["ca_key"], _key_pem(ca_key), private=True)
    write_file(out["ca_cert"], ca.public_bytes(serialization.Encoding.PEM))
    _issue_server(folder, ca, ca_key, list(hosts or []), days=days)
    return out


def _issue_server(folder: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str], *,
                  days: int) -> list[str]:
    names = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    now = _now()
    end = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
           .issuer_name(ca.subject).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(end)
           .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
           .sign(ca_key, hashes.SHA384()))
    write_file(folder / "server.key", _key_pem(srv_key), private=True)
    write_file(folder / "server.crt", srv.public_bytes(serialization.Encoding.PEM))
    return names


def server_hosts(folder: Path) -> list[str]:
    """The host names and addresses the current server certificate is valid for."""
    srv = x509.load_pem_x509_certificate((Path(folder) / "server.crt").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def renew_server(folder: Path, add_hosts: list[str] | None = None, *, days: int = 825) -> list[str]:
    """Re-issue the SuperLink's certificate with the same CA: renewal, and/or more host names.

    The sites keep their ``ca.crt``; restart ``rectalfl server start`` to use the new certificate.
    Returns the host names the new certificate is valid for.
    """
    folder = Path(folder)
    for name in ("ca.crt", "ca.key"):
        if not (folder / name).is_file():
            raise CertError(f"{folder / name} not found: the server certificate is signed with the consortium "
                            "CA's key (keep ca.key offline and bring it here for this step)")
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{folder / 'ca.key'} is not the consortium CA's EC key")
    if ca.not_valid_after_utc <= _now() + dt.timedelta(days=1):
        raise CertError(f"the consortium CA expires on {ca.not_valid_after_utc:%Y-%m-%d}: a new CA is needed "
                        f"(`rectalfl certs init --force`, then send ca.crt to every site)")
    old = server_hosts(folder) if (folder / "server.crt").is_file() else []
    return _issue_server(folder, ca, ca_key, [*old, *(add_hosts or [])], days=days)


# --------------------------------------------------------------------------- site keys
def _check_name(name: str) -> None:
    if not SITE_NAME.match(name):
        raise CertError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (max 64), starting with a "
                        "letter or digit")


def add_site(folder: Path, name: str, *, force: bool = False) -> dict[str, Path]:
    """Create a hospital's SuperNode key pair under ``folder/sites/<name>/``.

    With ``force`` an existing key is replaced (prefer :func:`rotate_site`, which also revokes it).
    """
    _check_name(name)
    folder = Path(folder)
    if not (folder / "ca.crt").is_file():
        raise CertError(f"{folder / 'ca.crt'} not found: run `rectalfl certs init --dir {folder}` first")
    d = folder / "sites" / name
    if (d / "site.key").exists() and not force:
        raise CertError(f"{d / 'site.key'} exists; to give {name} a new key use `rectalfl certs rotate-site {name} "
                        f"--dir {folder}` (the old key is revoked)")
    key = ec.generate_private_key(ec.SECP384R1())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out = {"key": d / "site.key", "pub": d / "site.pub"}
    # flower-supernode reads the private key in OpenSSH format
    write_file(out["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), private=True)
    write_file(out["pub"], pub + f" rectalfl-site-{name}\n".encode())
    return out


def load_public_key(data: bytes | Path) -> ec.EllipticCurvePublicKey:
    """An EC public key from OpenSSH (``site.pub``) or PEM bytes, or a file holding either."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else bytes(data)
    text = raw.strip()
    try:
        key = (serialization.load_ssh_public_key(text) if text.startswith(b"ecdsa-") else
               serialization.load_pem_public_key(text))
    except (ValueError, TypeError) as exc:
        raise CertError(f"not an EC public key (OpenSSH or PEM): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"not an EC public key: {type(key).__name__}")
    return key


def key_fingerprint(data: bytes | Path | ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of the key's DER SubjectPublicKeyInfo: the same for its OpenSSH and PEM forms
    (Flower's node info carries the PEM form of the key a SuperNode authenticated with)."""
    key = data if isinstance(data, ec.EllipticCurvePublicKey) else load_public_key(data)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def site_public_keys(folder: Path) -> dict[str, Path]:
    """``{site name: public key file}`` for every site key under ``folder/sites`` (revoked ones excluded)."""
    revoked = revoked_keys(folder)
    out = {}
    for p in sorted((Path(folder) / "sites").glob("*/site.pub")):
        try:
            if key_fingerprint(p) in revoked:
                continue
        except CertError:
            continue
        out[p.parent.name] = p
    return out


def consortium_keys(folder: Path, sites: list[str]) -> dict[str, Path]:
    """The public key file of each site the consortium config lists, or a CertError saying what to do.

    The expected sites come from the config (``deploy.sites``), never from whatever key files sit in
    ``certs/sites``; a listed site whose key was revoked is an error, not silently skipped.
    """
    folder = Path(folder)
    revoked = revoked_keys(folder)
    out: dict[str, Path] = {}
    for site in sites:
        _check_name(site)
        pub = folder / "sites" / site / "site.pub"
        if not pub.is_file():
            gone = [r for r in revoked.values() if r.get("site") == site]
            why = f" (its key was revoked on {gone[-1].get('revoked_at', '?')})" if gone else ""
            raise CertError(f"deploy.sites lists {site} but {pub} does not exist{why}: create a key with "
                            f"`rectalfl certs add-site {site} --dir {folder}` or remove {site} from deploy.sites")
        fp = key_fingerprint(pub)
        if fp in revoked:
            raise CertError(f"{site}'s key {pub} was revoked ({revoked[fp].get('revoked_at', '?')}); issue a new one "
                            f"with `rectalfl certs rotate-site {site} --dir {folder}`")
        out[site] = pub
    return out


def revoked_keys(folder: Path) -> dict[str, dict]:
    """``{fingerprint: {"site", "revoked_at", "reason"}}`` of every revoked site key."""
    path = Path(folder) / REVOKED_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CertError(f"{path} is not valid JSON ({exc}); restore it from a backup") from None
    return dict(data) if isinstance(data, dict) else {}


def revoke_site(folder: Path, name: str, reason: str = "revoked by the operator") -> dict[str, str]:
    """Record ``name``'s current key as revoked and move its files to ``revoked/<name>-<time>/``.

    The SuperLink-side step (unregistering the node) is :func:`server.deploy.revoke` (``rectalfl certs
    revoke``); this is the part that makes the key refused at every later ``server start``.
    Returns ``{"site", "fingerprint", "moved_to"}``.
    """
    _check_name(name)
    folder = Path(folder)
    d = folder / "sites" / name
    pub = d / "site.pub"
    if not pub.is_file():
        raise CertError(f"no key for site {name} in {folder / 'sites'} (nothing to revoke)")
    fp = key_fingerprint(pub)
    revoked = revoked_keys(folder)
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    revoked[fp] = {"site": name, "revoked_at": _now().isoformat(timespec="seconds"), "reason": reason}
    write_file(folder / REVOKED_FILE, (json.dumps(revoked, indent=2, sort_keys=True) + "\n").encode())
    dest = folder / "revoked" / f"{name}-{stamp}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(d), str(dest))
    return {"site": name, "fingerprint": fp, "moved_to": str(dest)}


def rotate_site(folder: Path, name: str) -> dict[str, Path]:
    """Revoke ``name``'s current key and issue a new key pair (give the new ``site.key`` to the site)."""
    revoke_site(folder, name, reason="rotated")
    return add_site(folder, name)


def check_server_files(folder: Path) -> dict[str, Path]:
    """The CA and server files the SuperLink needs, or a CertError naming what is missing."""
    folder = Path(folder)
    files = {"ca_cert": folder / "ca.crt", "server_cert": folder / "server.crt", "server_key": folder / "server.key"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise CertError(f"missing {', '.join(missing)}: run `rectalfl certs init --dir {folder}`")
    return files
