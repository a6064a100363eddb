"""Typed settings of the feature service (env prefix FEATURE_SERVICE_)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from infermesh.settings import ServiceSettings


class FeatureServiceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FEATURE_SERVICE_", extra="ignore")

    port: int = Field(8021, description="gRPC port; 0 picks a free one (written to port_file).")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the feature vectors (redis:// or rediss:// for TLS). May carry credentials "
        "(redis://user:password@host); prefer redis_password_file.",
    )
    redis_username: str = Field("", description="ACL user to authenticate as (empty: the URL's, else `default`).")
    redis_password_file: Path | None = Field(
        None, description="File holding the Redis password (read at start, never logged); overrides the URL's."
    )
    redis_ca_file: Path | None = Field(
        None, description="PEM CA that signed Redis's certificate (rediss://); unset: the system's CAs."
    )
    redis_cert_file: Path | None = Field(
        None, description="PEM client certificate for Redis (with tls-auth-clients yes); with redis_key_file."
    )
    redis_key_file: Path | None = Field(None, description="Private key of redis_cert_file.")
    views_path: Path = Field(Path("feature_views.json"), description="JSON registry of the feature views served.")
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Connect and per-command timeout for Redis; past it a call fails as UNAVAILABLE."
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Redis connections in the pool; more concurrent reads wait (up to redis_timeout_s)."
    )
    max_entities_per_read: int = Field(
        10_000, ge=1, description="Most entity keys one call may read (summed over a batch) or rows it may write."
    )
    key_prefix: str = Field("im", min_length=1, description="Namespace of every key: {prefix}:fv:{view}:{entity_id}.")
    writer_identities: str = Field(
        "",
        description="Comma-separated names a client certificate (mutual TLS) may carry, as its subject's CN or a "
        "subject alternative name, to write features. Writes are refused unless this or write_token_sha256_file "
        "is set; reads are open to every caller the transport admits.",
    )
    write_token_sha256_file: Path | None = Field(
        None,
        description="File of the SHA-256 hex digests of accepted write tokens, one per line (re-read when it "
        "changes); a writer sends 'authorization: Bearer <token>'.",
    )
    max_future_skew_s: float = Field(
        300.0, ge=0, description="A row whose event time is further than this ahead of the service's clock is refused."
    )
    ttl_max_age_multiple: float = Field(
        10.0, ge=0, description="Keys expire this many times their view's max_age after their last write (0: no TTL)."
    )
    ttl_default_s: float = Field(
        0.0, ge=0, description="TTL of the keys of views with max_age 0 (never stale); 0: they do not expire."
    )

    def writers(self) -> list[str]:
        return [name.strip() for name in self.writer_identities.split(",") if name.strip()]

    def redis_connection_url(self) -> str:
        """redis_url with the username, the password (from its file) and the TLS files folded in: the one URL the
        store connects with. Holds the secret: never log it, pass it on, or put it in an error."""
        parts = urlsplit(self.redis_url)
        username = self.redis_username or (parts.username or "")
        password = (
            self.redis_password_file.read_text().strip() if self.redis_password_file is not None else parts.password
        ) or ""
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = host + (f":{parts.port}" if parts.port else "")
        if username or password:
            netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{netloc}"
        query = dict(parse_qsl(parts.query))
        for name, path in (
            ("ssl_ca_certs", self.redis_ca_file),
            ("ssl_certfile", self.redis_cert_file),
            ("ssl_keyfile", self.redis_key_file),
        ):
            if path is not None:
                query[name] = str(path)
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))
