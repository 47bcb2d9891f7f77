"""Start the executor ``runtime.executor`` names (apart from :mod:`aenode.infer.executor`,
which the job runner imports: only this module imports the runtime and Ray)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aenode.errors import ConfigError
from aenode.infer.executor import Executor, LocalExecutor

if TYPE_CHECKING:
    from aenode.config import Settings
    from aenode.infer.registry import Registry

__all__ = ["open_executor"]


def open_executor(settings: Settings, registry: Registry) -> Executor:
    """The executor ``runtime.executor`` names, started and ready for :meth:`Executor.infer`.

    Parameters
    ----------
    settings : Settings
        ``runtime`` (executor, device, Ray address and resources) and ``models.path``.
    registry : Registry
        The loaded and validated models.

    Returns
    -------
    Executor

    Raises
    ------
    aenode.errors.ConfigError
        Naming ``runtime.executor`` when Ray is selected but not installed, or
        ``runtime.ray.address`` when the cluster cannot be reached or lacks the resources.
    """
    if settings.runtime.executor == "local":
        from aenode.infer.runtime import Runtime

        return LocalExecutor(Runtime(registry, settings.runtime))
    try:
        from aenode.infer.ray_executor import RayExecutor
    except ImportError as exc:
        raise ConfigError(
            "runtime.executor: ray selected but Ray is not installed "
            f"(pip install 'aenode[ray]'): {exc}"
        ) from None
    return RayExecutor.start(settings, registry)
