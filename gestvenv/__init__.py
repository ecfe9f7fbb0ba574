"""gestvenv: ephemeral Python environments, destroyed with a guarantee.

    async with gestvenv.ephemeral("test-env", packages=["requests"]) as env:
        result = await env.execute("python -c 'import requests'")

Only the names in ``__all__`` are public; the modules behind them are not.
"""

# The names are loaded on first use (PEP 562): ``import gestvenv`` costs nothing, and a
# command of the CLI pays only for what it uses (the light ones are guarded by
# tests/unit/test_import_cost.py).
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api.client import connect
    from .cleanup import CleanupReport, cleanup_environments
    from .config import Config, load_config
    from .context import (
        Environment,
        EphemeralContext,
        attach,
        create_environment,
        destroy_environment,
        ephemeral,
        list_environments,
    )
    from .exceptions import (
        BuildError,
        CommandError,
        CommandNotExecutableError,
        CommandNotFoundError,
        CommandNotRunningError,
        ConfigError,
        DiskFullError,
        EnvironmentClosedError,
        EnvironmentExistsError,
        EnvironmentNotFoundError,
        GestvenvError,
        InvalidNameError,
        QuotaExceededError,
        RuntimeUnavailableError,
        UnenforceableLimitError,
        UnsafePathError,
        ValidationError,
    )
    from .handle import CommandHandle
    from .models import (
        Enforcement,
        ExecResult,
        IsolationLevel,
        LimitStatus,
        ResourceLimits,
        StorageBackend,
    )
    from .monitor import EnvUsage, Stats, global_stats
    from .runtime import Usage
    from .sync import SyncEnvironment, ephemeral_sync

_EXPORTS = {
    "BuildError": "exceptions",
    "CleanupReport": "cleanup",
    "CommandError": "exceptions",
    "CommandHandle": "handle",
    "CommandNotExecutableError": "exceptions",
    "CommandNotFoundError": "exceptions",
    "CommandNotRunningError": "exceptions",
    "Config": "config",
    "ConfigError": "exceptions",
    "DiskFullError": "exceptions",
    "Enforcement": "models",
    "EnvUsage": "monitor",
    "Environment": "context",
    "EnvironmentClosedError": "exceptions",
    "EnvironmentExistsError": "exceptions",
    "EnvironmentNotFoundError": "exceptions",
    "EphemeralContext": "context",
    "ExecResult": "models",
    "GestvenvError": "exceptions",
    "InvalidNameError": "exceptions",
    "IsolationLevel": "models",
    "LimitStatus": "models",
    "QuotaExceededError": "exceptions",
    "ResourceLimits": "models",
    "RuntimeUnavailableError": "exceptions",
    "Stats": "monitor",
    "StorageBackend": "models",
    "SyncEnvironment": "sync",
    "UnenforceableLimitError": "exceptions",
    "UnsafePathError": "exceptions",
    "Usage": "runtime",
    "ValidationError": "exceptions",
    "attach": "context",
    "cleanup_environments": "cleanup",
    "connect": "api.client",
    "create_environment": "context",
    "destroy_environment": "context",
    "ephemeral": "context",
    "ephemeral_sync": "sync",
    "global_stats": "monitor",
    "list_environments": "context",
    "load_config": "config",
}

__all__ = [
    "BuildError",
    "CleanupReport",
    "CommandError",
    "CommandHandle",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "CommandNotRunningError",
    "Config",
    "ConfigError",
    "DiskFullError",
    "Enforcement",
    "EnvUsage",
    "Environment",
    "EnvironmentClosedError",
    "EnvironmentExistsError",
    "EnvironmentNotFoundError",
    "EphemeralContext",
    "ExecResult",
    "GestvenvError",
    "InvalidNameError",
    "IsolationLevel",
    "LimitStatus",
    "QuotaExceededError",
    "ResourceLimits",
    "RuntimeUnavailableError",
    "Stats",
    "StorageBackend",
    "SyncEnvironment",
    "UnenforceableLimitError",
    "UnsafePathError",
    "Usage",
    "ValidationError",
    "__version__",
    "attach",
    "cleanup_environments",
    "connect",
    "create_environment",
    "destroy_environment",
    "ephemeral",
    "ephemeral_sync",
    "global_stats",
    "list_environments",
    "load_config",
]


if not TYPE_CHECKING:  # (hidden from mypy: a module __getattr__ would type every typo as Any)
    from .lazy import exports

    __getattr__ = exports(__name__, _EXPORTS, globals())
    del exports


def __dir__() -> list[str]:
    return sorted(__all__)
