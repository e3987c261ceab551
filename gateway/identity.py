"""Ed25519 identities: the account id is the public key.

Keys live in ``$DECOMPUTE_HOME`` (default ``~/.decompute``), created on first use with mode 0600.
Authentication signs a fresh gateway challenge, bound to the role, so a signature made for one
connection or role can never be replayed for another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "id_ed25519"
AUTH_CONTEXT = b"decompute-auth-v1|"


def decompute_home() -> Path:
    """The directory holding this user's keys: ``$DECOMPUTE_HOME`` or ``~/.decompute``."""
    return Path(os.environ.get("DECOMPUTE_HOME") or Path.home() / ".decompute")


@dataclass(frozen=True, slots=True)
class Identity:
    """A key pair; ``account`` is the hex of the 32-byte public key."""

    private_key: Ed25519PrivateKey
    #: Derived once: every receipt the gateway signs names it.
    public_bytes: bytes = field(init=False, repr=False)
    account: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        object.__setattr__(self, "public_bytes", raw)
        object.__setattr__(self, "account", raw.hex())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, home: Path | str | None = None, name: str = KEY_FILE) -> Identity:
        """Load the key in ``home`` or create it there (directory 0700, file 0600)."""
        home = Path(home) if home is not None else decompute_home()
        path = home / name
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} is not an Ed25519 key; move it away to make a new one")
            return cls(key)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = cls.generate()
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity


def auth_message(nonce: bytes, role: str) -> bytes:
    """The exact bytes a peer signs to answer a challenge."""
    return AUTH_CONTEXT + nonce + b"|" + role.encode()


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` signs ``data`` under ``public_key``; never raises on bad input."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
