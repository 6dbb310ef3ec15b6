"""API keys and tenants, kept in the compacted `ferry.keys` topic as hashes only.

A key is `fk_<id>_<secret>`: the id (public) finds the record, the SHA-256 of the whole key
is what is stored and compared, in constant time. Keys are 190 bits of randomness, so a
plain hash is enough; a slow password hash would only slow every request down.
Rows: `key:<id>` -> `schemas.tables.ApiKeyRecord`; `tenant:<name>` -> `TenantRecord`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import TypeVar

from edge.tables import ControlTable, put
from schemas import SchemaError
from schemas.fields import from_dict
from schemas.tables import ApiKeyRecord, TenantRecord
from schemas.topics import KEYS_TOPIC

KEY_FORMAT = re.compile(r"^fk_([0-9a-f]{12})_([A-Za-z0-9_-]{32})$")
TENANT = re.compile(r"^[a-zA-Z0-9._-]{1,100}$")
_DUMMY = hashlib.sha256(b"no such key").hexdigest()
T = TypeVar("T")
log = logging.getLogger("ferry.keys")


@dataclass(frozen=True)
class Tenant:
    name: str
    rpm: int | None  # requests per minute; None = unlimited
    tpm: int | None  # tokens (prompt + max_new_tokens) per minute; None = unlimited
    # Reply topics this tenant may name besides ferry.results and ferry.replies.* (None:
    # any topic outside Ferry's own).
    reply_prefix: str | None = None


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id(api_key: str) -> str | None:
    match = KEY_FORMAT.fullmatch(api_key)
    return match.group(1) if match else None


class KeyRing(ControlTable):
    """Authenticates API keys against the live `ferry.keys` table."""

    topic = KEYS_TOPIC

    def _row(self, cls: type[T], key: str) -> T | None:
        """The row `key` validated as `cls`; None when absent or when it does not fit (a key
        that does not fit authenticates nobody; limits that do not fit limit nothing)."""
        value = self.view.values.get(key)
        if value is None:
            return None
        try:
            return from_dict(cls, value)
        except SchemaError as exc:
            log.warning("%s: row %r ignored: %s", KEYS_TOPIC, key, exc)
            return None

    def authenticate(self, api_key: str | None) -> Tenant | None:
        kid = key_id(api_key or "")
        record = self._row(ApiKeyRecord, f"key:{kid}") if kid else None
        # Compare even when the id is unknown, so timing tells nothing about which ids exist.
        ok = hmac.compare_digest(_digest(api_key or ""), record.sha256 if record else _DUMMY)
        if not ok or record is None:
            return None
        return self.tenant(record.tenant)

    def tenant(self, name: str) -> Tenant:
        limits = self._row(TenantRecord, f"tenant:{name}") or TenantRecord()
        return Tenant(name, limits.rpm, limits.tpm, limits.reply_prefix or None)

    def listing(self) -> list[dict[str, object]]:
        """Every key (id, tenant, created) with its tenant's limits; never a secret."""
        rows = []
        for name in sorted(self.view.values):
            if name.startswith("key:") and (record := self._row(ApiKeyRecord, name)):
                tenant = self.tenant(record.tenant)
                rows.append({"id": name[4:], "tenant": tenant.name, "rpm": tenant.rpm,
                             "tpm": tenant.tpm, "created_at": record.created_at})
        return rows


async def add_key(bootstrap: str, tenant: str, rpm: int | None = None,
                  tpm: int | None = None, reply_prefix: str | None = None) -> str:
    """Create a key for `tenant` (setting its limits when given); returns the key, once."""
    if not TENANT.fullmatch(tenant):
        raise ValueError(f"tenant: {tenant!r} must match {TENANT.pattern}")
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}: must be > 0, got {value}")
    kid = secrets.token_hex(6)
    api_key = f"fk_{kid}_{secrets.token_urlsafe(24)}"
    if reply_prefix is not None and not TENANT.fullmatch(reply_prefix):
        raise ValueError(f"reply_prefix: {reply_prefix!r} must match {TENANT.pattern}")
    if rpm is not None or tpm is not None or reply_prefix is not None:
        await set_limits(bootstrap, tenant, rpm, tpm, reply_prefix)
    await put(bootstrap, KEYS_TOPIC, f"key:{kid}", ApiKeyRecord(tenant, _digest(api_key)))
    return api_key


async def set_limits(bootstrap: str, tenant: str, rpm: int | None, tpm: int | None,
                     reply_prefix: str | None = None) -> None:
    await put(bootstrap, KEYS_TOPIC, f"tenant:{tenant}", TenantRecord(rpm, tpm, reply_prefix))


async def revoke_key(bootstrap: str, key_or_id: str) -> str:
    """Revoke by key id or by the key itself; returns the id."""
    kid = key_id(key_or_id) or key_or_id
    if not re.fullmatch(r"[0-9a-f]{12}", kid):
        raise ValueError(f"key: {key_or_id!r} is neither a key nor a key id")
    await put(bootstrap, KEYS_TOPIC, f"key:{kid}", None)
    return kid


async def list_keys(bootstrap: str) -> list[dict[str, object]]:
    async with KeyRing.snapshot(bootstrap) as ring:
        return ring.listing()
