"""The tenant registry: tenant records (models.py) kept in Redis (store.py), with their backend
passwords sealed at rest (crypto.py), read through an in-process cache that pub/sub keeps fresh
(cache.py).
"""

from router.registry.cache import TenantCache
from router.registry.crypto import EncryptedSecret, Keyring, KeyringError, generate_key
from router.registry.errors import (
    RegistryDecryptError,
    RegistryError,
    RegistryUnavailable,
    TenantExists,
    TenantNotFound,
    UserNotFound,
    VersionConflict,
)
from router.registry.invalidation import Invalidation
from router.registry.models import (
    FALLBACK_TENANT_ID,
    Tenant,
    TenantCreate,
    TenantMode,
    TenantPatch,
    TenantUpdate,
    TenantUser,
    UserCreate,
)
from router.registry.store import RedisStore

__all__ = [
    "FALLBACK_TENANT_ID",
    "EncryptedSecret",
    "Invalidation",
    "Keyring",
    "KeyringError",
    "RedisStore",
    "RegistryDecryptError",
    "RegistryError",
    "RegistryUnavailable",
    "Tenant",
    "TenantCache",
    "TenantCreate",
    "TenantExists",
    "TenantMode",
    "TenantNotFound",
    "TenantPatch",
    "TenantUpdate",
    "TenantUser",
    "UserCreate",
    "UserNotFound",
    "VersionConflict",
    "generate_key",
]
