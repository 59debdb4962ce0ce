"""CURVE keys for moed over TCP (off unless ``moed serve --tcp`` is used).

Keys use ZeroMQ's certificate files (``zmq.auth.create_certificates``), kept
in a 0700 directory (``MOED_CURVE_DIR``, default ``<user config dir>/moed/curve``):

- ``server.key`` / ``server.key_secret``: the daemon's key pair;
- ``client.key`` / ``client.key_secret``: this user's client key pair;
- ``authorized/*.key``: client public keys the daemon accepts. The local
  client key is authorized on creation; copy another machine's ``client.key``
  there to let it in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .paths import born_private, ensure_private_dir


@dataclass(frozen=True)
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes


def curve_dir() -> Path:
    override = os.environ.get("MOED_CURVE_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir("moed")) / "curve"


def authorized_dir() -> Path:
    return curve_dir() / "authorized"


def _keypair(name: str) -> tuple[bytes, bytes]:
    """Load (public, secret) ``name``, creating it (files 0600) the first time."""
    import zmq.auth

    directory = ensure_private_dir(curve_dir())
    secret_file = directory / f"{name}.key_secret"
    if not secret_file.exists():
        with born_private():
            zmq.auth.create_certificates(directory, name)
        for f in (directory / f"{name}.key", secret_file):
            os.chmod(f, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    return public, secret


def server_keys() -> tuple[bytes, bytes]:
    """The daemon's (public, secret) keys; also makes sure the local client is authorized."""
    keys = _keypair("server")
    client_keys()
    return keys


def client_keys() -> ClientKeys:
    """This user's client keys and the server's public key (for a daemon of the same user)."""
    public, secret = _keypair("client")
    authorized = ensure_private_dir(authorized_dir())
    mine = authorized / "client.key"
    if not mine.exists():
        shutil.copyfile(curve_dir() / "client.key", mine)
        os.chmod(mine, 0o600)
    server_public_file = curve_dir() / "server.key"
    if not server_public_file.exists():
        raise FileNotFoundError(f"no server key at {server_public_file}: start the daemon with --tcp once, or copy its server.key there")
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_public_file)
    return ClientKeys(server_public, public, secret)
