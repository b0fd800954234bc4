"""Bearer token for the local service: creation, storage only the user can read, constant-time checks."""

from __future__ import annotations

import hmac
import os
import secrets
import sys
from pathlib import Path
from typing import Optional

from idgbr.errors import IdgbrError

# Shorter tokens in a hand-written file would be guessable; 16 characters of url-safe base64 is ~96 bits.
MIN_TOKEN_LENGTH = 16


def generate_token() -> str:
    """A fresh random token (256 bits, url-safe)."""
    return secrets.token_urlsafe(32)


def write_token_file(path: Path, token: str) -> None:
    """Write TOKEN to PATH atomically, readable by the owner only (mode 0600; best effort on Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Create the file with 0600 from the start so the token is never readable by others, even briefly.
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _restrict(path)


def _restrict(path: Path) -> None:
    # On Windows chmod only toggles read-only; the user profile directory is already private there.
    if os.name != "nt":
        os.chmod(path, 0o600)


def load_or_create_token(path: Optional[Path]) -> str:
    """The token for this service run.

    No PATH: a new random token (the caller decides where to store it). PATH missing: a new random token
    written there. PATH present: its content, which must be one line of at least MIN_TOKEN_LENGTH characters.
    """
    if path is None:
        return generate_token()
    if not path.exists():
        token = generate_token()
        write_token_file(path, token)
        return token
    if path.is_dir():
        raise IdgbrError(f"token file {path} is a directory: pass a file path to --token-file")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise IdgbrError(f"cannot read token file {path} ({exc}): fix its permissions or delete it") from exc
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token) or not token.isascii():
        raise IdgbrError(
            f"token file {path} must hold one line of at least {MIN_TOKEN_LENGTH} printable ASCII characters "
            "without spaces: delete it to have a random token generated"
        )
    if os.name != "nt" and path.stat().st_mode & 0o077:
        # Someone else could read the token; tighten instead of refusing, and say so.
        print(f"idgbr: token file {path} was readable by other users; changed its mode to 0600", file=sys.stderr)
        _restrict(path)
    return token


def bearer_matches(header_value: Optional[str], token: str) -> bool:
    """True when an Authorization header value is exactly 'Bearer <token>' (scheme case-insensitive)."""
    if not header_value:
        return False
    scheme, _, supplied = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest on bytes: constant time in the length of the expected token, and accepts any characters.
    return hmac.compare_digest(supplied.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))
