"""The HTTP gateway's bearer token: random, made at first start, kept in a 0600 file.

Loopback TCP is reachable by every account on the machine, so the gateway asks
for ``Authorization: Bearer <token>`` on every route unless ``--http-no-auth``.
The token lives in ``<user config dir>/moed/http-token`` (``MOED_HTTP_TOKEN_FILE``
overrides the path); ``moectl http-token`` prints it for the owner. The module
imports neither aiohttp nor MLX, so moectl can use it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import platformdirs

from moed_client.paths import ensure_private_dir

FILE_ENV = "MOED_HTTP_TOKEN_FILE"
TOKEN_BYTES = 32  # 256 random bits, url-safe base64


def token_file() -> Path:
    override = os.environ.get(FILE_ENV)
    return Path(override) if override else Path(platformdirs.user_config_dir("moed", appauthor=False)) / "http-token"


def _read(path: Path) -> str | None:
    """The token in ``path``, or None when there is none yet; a file others could read or write is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PermissionError(f"cannot read the HTTP token file {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{path} is not a plain file of yours; refusing it as the HTTP token")
        if st.st_mode & 0o077:
            raise PermissionError(f"{path} is readable or writable by other users (mode {oct(st.st_mode & 0o777)}); "
                                  "delete it and a new token is made at the next start")
        token = f.read().strip()
    return token or None


def load_or_create() -> str:
    """The token, made (0600, created exclusively so two first starts agree) when there is none."""
    path = token_file()
    token = _read(path)
    if token is not None:
        return token
    ensure_private_dir(path.parent)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    # Written whole under a private name, then linked into place: a reader never sees a half-written
    # file, and link() fails when another first start won the race, whose token is then the one.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.link(temp, path)
    except FileExistsError:
        return _read(path) or token
    finally:
        temp.unlink(missing_ok=True)
    return token


def load() -> str | None:
    """The token if one was made, for clients (moectl, tests, benchmarks); never creates one."""
    return _read(token_file())
