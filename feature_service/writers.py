"""Who may write features: callers whose mutual-TLS certificate names an allowed writer, or who present a write
token whose SHA-256 is in the token file. Reads stay open to every caller the transport admits.

A forged write is worse than a refused read: one far-future row shadows every genuine update of an entity. So
writes are closed unless a writer is configured (`FEATURE_SERVICE_WRITER_IDENTITIES`,
`FEATURE_SERVICE_WRITE_TOKEN_SHA256_FILE`). Tokens are compared by their SHA-256 (the file holds digests only)
and never logged. The token file is re-read when it changes on disk, so tokens rotate without a restart. Nothing
here knows of gRPC: the servicer hands in the identities its transport verified and the bearer credential.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from infermesh.errors import PermissionDenied, Unauthenticated
from infermesh.watched_file import WatchedFile

BEARER = "bearer "
_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_TOKENS = 1024  # a token file is a handful of writers' digests, not a database


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_token_digests(path: Path) -> frozenset[str]:
    """The token file: one SHA-256 hex digest per line (`sha256sum`'s output works: the first word counts);
    blank lines and `#` comments are skipped. ValueError naming the line that is not a digest (not its text)."""
    digests: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        digest = words[0].lower()
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"{path.name} line {number}: not a SHA-256 hex digest")
        digests.add(digest)
    if len(digests) > MAX_TOKENS:
        raise ValueError(f"{path.name}: more than {MAX_TOKENS} token digests")
    return frozenset(digests)


def write_token_file(path: Path, token: str) -> None:
    """Write the digest of `token` as the token file (0600, replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.touch(mode=0o600)
    partial.write_text(token_digest(token) + "\n")
    partial.replace(path)


class WriterPolicy:
    """Decides whether a caller may write. `identities`: names a client certificate may carry (its subject's
    common name or a subject alternative name) to be a writer; `token_file`: the digests of accepted tokens."""

    def __init__(self, identities: Iterable[str] = (), token_file: Path | None = None) -> None:
        self.identities = frozenset(name for name in identities if name)
        self._tokens = WatchedFile(token_file, read_token_digests) if token_file is not None else None

    @property
    def configured(self) -> bool:
        return bool(self.identities) or self._tokens is not None

    def authorize(self, peer_identities: Iterable[str], authorization: str | None) -> None:
        """Return if the caller may write; else Unauthenticated (no usable credential, or a token that is not
        accepted) or PermissionDenied (writes are off, or the caller's certificate names no writer)."""
        if not self.configured:
            raise PermissionDenied(
                "feature writes are disabled: the feature service has no writers configured "
                "(FEATURE_SERVICE_WRITER_IDENTITIES, FEATURE_SERVICE_WRITE_TOKEN_SHA256_FILE)"
            )
        if authorization:
            if self._tokens is None:
                raise Unauthenticated("write tokens are not accepted here")
            if authorization[: len(BEARER)].lower() != BEARER:
                raise Unauthenticated("authorization metadata must be 'Bearer <write token>'")
            self._tokens.refresh()
            # A set lookup of the token's SHA-256: what its timing may tell of the stored digests does not help
            # anyone find a token (a preimage of SHA-256).
            if token_digest(authorization[len(BEARER) :].strip()) in self._tokens.value:
                return
            raise Unauthenticated("write token not accepted")
        peers = set(peer_identities)
        if peers & self.identities:
            return
        if peers:
            raise PermissionDenied("this client certificate may not write features")
        raise Unauthenticated(
            "feature writes need a write token ('authorization: Bearer <token>' metadata) or a writer's client "
            "certificate"
        )
