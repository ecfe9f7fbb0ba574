"""gestvenv: ephemeral Python environments, destroyed with a guarantee.

    async with gestvenv.ephemeral("test-env", packages=["requests"]) as env:
        result = await env.execute("python -c 'import requests'")

Only the names in ``__all__`` are public; the modules behind them are not.
"""

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

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "CommandError",
    "CommandNotExecutableError",
    "CommandNotFoundError",
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
    "create_environment",
    "destroy_environment",
    "ephemeral",
    "ephemeral_sync",
    "global_stats",
    "list_environments",
    "load_config",
]
