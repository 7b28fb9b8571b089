"""Cryptographic building blocks: key loading, signatures, key derivation, PRG, AEAD and the MAC.

Everything here is a thin layer over the ``cryptography`` package (OpenSSL) plus the modular
arithmetic of the integrity tag, done with numpy on uint64 arrays.

The integrity tag
-----------------
A site's encoded contribution is a vector ``v`` of signed integers (``|sum over sites| < 2**63``).
Its tag is three linear MACs, all with secret coefficients ``a`` drawn from the group key (which the
server never learns):

* ``t1 = <a1, v> mod P61`` with the Mersenne prime ``P61 = 2**61 - 1``;
* ``t2 = <a2, v> mod P31`` and ``t3 = <a3, v> mod P31`` with ``P31 = 2**31 - 1``.

Sums of the tags are tags of the sum. If the server changes the total by ``D != 0`` (as integers,
``|D_k| < 2**64`` once the sites' range check has passed), some ``D_k`` is non-zero modulo ``P61``
(then ``t1`` is wrong except with probability ``1/P61``) or every non-zero ``D_k`` is ``m * P61`` with
``1 <= |m| <= 8``, which ``P31`` does not divide (then ``t2`` and ``t3`` are both wrong except with
probability ``1/P31**2``). A single prime would not do: adding ``P61`` to one element is invisible
modulo ``P61``. The tag travels as four 32-bit limbs inside the ring so the server's plain sum
mod ``2**64`` carries it exactly (see :func:`tag_limbs`).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

PROTOCOL = b"rectalfl-secagg/v1"
P61 = (1 << 61) - 1
P31 = (1 << 31) - 1
#: words of MAC coefficients per encoded element (a1, a2, a3)
MAC_WORDS = 3
#: length of the tag vector that travels (limbs of t1, t2, t3)
TAG_LEN = 4
#: exclusive upper bound of each limb of one site's tag (a sum over n sites stays below n times these)
TAG_LIMB_BOUNDS = (1 << 29, 1 << 32, P31, P31)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as shared.certs.SITE_NAME
_M32 = np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------------------------------- keys

def load_identity_key(key: ec.EllipticCurvePrivateKey | bytes | str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """A site's long-term identity key (EC P-384), from an object, OpenSSH/PEM bytes or a file path.

    Raises
    ------
    ValueError
        If the key is not an EC P-384 private key, naming the file.
    """
    where = "identity key"
    if isinstance(key, str | os.PathLike):
        where = str(key)
        data = Path(key).read_bytes()
    elif isinstance(key, bytes):
        data = key
    else:
        data = None
    if data is not None:
        loader = (serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data
                  else serialization.load_pem_private_key)
        key = loader(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError(f"{where}: need an EC P-384 private key (certs/sites/<name>/site.key), "
                         f"got {type(key).__name__}")
    return key


def load_public_key(key: ec.EllipticCurvePublicKey | bytes | str | os.PathLike[str], *,
                    name: str = "?") -> ec.EllipticCurvePublicKey:
    """An EC P-384 public key from an object, OpenSSH text (``ecdsa-sha2-nistp384 ...``) or a file."""
    if isinstance(key, os.PathLike) or (isinstance(key, str) and not key.startswith("ecdsa-")):
        key = Path(key).read_bytes()
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, bytes):
        key = (serialization.load_ssh_public_key(key.strip()) if key.startswith(b"ecdsa-")
               else serialization.load_pem_public_key(key))
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError(f"roster entry {name!r}: need an EC P-384 public key (site.pub), got {type(key).__name__}")
    return key


def load_roster(roster: Mapping[str, ec.EllipticCurvePublicKey | bytes | str | os.PathLike[str]]
                ) -> dict[str, ec.EllipticCurvePublicKey]:
    """``{site name: public key}`` from the site's own policy (objects, OpenSSH text or ``site.pub`` paths).

    Raises
    ------
    ValueError
        On a bad site name or key, naming the entry.
    """
    out = {}
    for name, key in roster.items():
        check_site_name(name, "roster")
        out[name] = load_public_key(key, name=name)
    return out


def public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """Canonical (compressed point) encoding, to compare keys."""
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def check_site_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise ValueError(f"{what}: site name {name!r} is not valid (letters, digits, '.', '_', '-', max 64)")
    return name


# ------------------------------------------------------------------------------ encodings

def lp(*parts: bytes | str) -> bytes:
    """Length-prefixed concatenation (unambiguous, for signatures and KDF labels)."""
    out = bytearray()
    for p in parts:
        b = p.encode() if isinstance(p, str) else bytes(p)
        out += struct.pack(">I", len(b)) + b
    return bytes(out)


def digest(*parts: bytes | str) -> bytes:
    return hashlib.sha256(lp(*parts)).digest()


def advert_payload(session_id: str, site: str, epk: bytes, participants: list[str], query_id: str) -> bytes:
    """What a site signs in its advert."""
    return lp(PROTOCOL, b"advert", session_id, site, epk, "\n".join(participants), query_id)


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    return key.sign(payload, ec.ECDSA(hashes.SHA384()))


def verify(key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        key.verify(signature, payload, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


# ------------------------------------------------------------------- KDF, PRG, AEAD

def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 extract-and-expand."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def expand(prk: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 expand only (``prk`` is already a uniform key)."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


def prg_u64(key: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 words: the AES-256-CTR key stream of a single-use ``key``."""
    if n == 0:
        return np.zeros(0, np.uint64)
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(bytes(8 * n)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, box: bytes, aad: bytes) -> bytes | None:
    """Inverse of :func:`seal`; ``None`` if the box was altered, forged or addressed elsewhere."""
    if len(box) < 12 + 16:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(box[:12], box[12:], aad)
    except InvalidTag:
        return None


# ------------------------------------------------------------------------- the MAC

def _mulmod_p61(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise ``a * b mod P61`` for uint64 arrays with entries < 2**61 (no 128-bit type needed)."""
    m31 = np.uint64((1 << 31) - 1)
    m30 = np.uint64((1 << 30) - 1)
    ah, al = a >> np.uint64(31), a & m31
    bh, bl = b >> np.uint64(31), b & m31
    mid = ah * bl + al * bh                      # < 2**62; times 2**31 ...
    s = (ah * bh) << np.uint64(1)                # 2**62 == 2 (mod P61); < 2**61
    s += mid >> np.uint64(30)                    # ... == (mid >> 30) + (mid & m30) * 2**31
    s += (mid & m30) << np.uint64(31)
    s += al * bl                                 # total < 2**63 + 2**33: no wrap
    s = (s & np.uint64(P61)) + (s >> np.uint64(61))
    return np.where(s >= np.uint64(P61), s - np.uint64(P61), s)


def _sum_mod(x: np.ndarray, p: int) -> int:
    """Exact ``sum(x) mod p`` for uint64 entries < 2**62 (split in 32-bit halves: no wrap below 2**32 terms)."""
    lo = int(np.sum(x & _M32, dtype=np.uint64))
    hi = int(np.sum(x >> np.uint64(32), dtype=np.uint64))
    return ((hi << 32) + lo) % p


def mac_coefficients(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``3 * n`` PRG words into the coefficient vectors (a1 mod P61, a2 and a3 mod P31)."""
    w = words.reshape(MAC_WORDS, -1)
    a1 = w[0] >> np.uint64(3)
    a1 = np.where(a1 >= np.uint64(P61), a1 - np.uint64(P61), a1)
    a2 = (w[1] >> np.uint64(33)) % np.uint64(P31)
    a3 = (w[2] >> np.uint64(33)) % np.uint64(P31)
    return a1, a2, a3


def mac(values: np.ndarray, coeffs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, int, int]:
    """The three MACs of a vector of signed integers (int64), see the module docstring."""
    v = np.asarray(values, dtype=np.int64)
    a1, a2, a3 = coeffs
    v1 = np.remainder(v, P61).astype(np.uint64)       # numpy remainder takes the divisor's sign
    v2 = np.remainder(v, P31).astype(np.uint64)
    t1 = _sum_mod(_mulmod_p61(a1, v1), P61)
    t2 = _sum_mod((a2 * v2) % np.uint64(P31), P31)    # products < 2**62: no wrap
    t3 = _sum_mod((a3 * v2) % np.uint64(P31), P31)
    return t1, t2, t3


def tag_limbs(tag: tuple[int, int, int]) -> np.ndarray:
    """The tag as four ring elements < 2**32 (:data:`TAG_LIMB_BOUNDS`): sums over < 2**31 sites are exact."""
    t1, t2, t3 = tag
    return np.array([t1 >> 32, t1 & 0xFFFFFFFF, t2, t3], dtype=np.uint64)


def tag_from_limbs(limbs: np.ndarray) -> tuple[int, int, int]:
    """Inverse of :func:`tag_limbs` applied to a sum of limb vectors (reduces modulo the primes)."""
    h, lo, t2, t3 = (int(x) for x in np.asarray(limbs, dtype=np.uint64))
    return ((h << 32) + lo) % P61, t2 % P31, t3 % P31
