"""Engines move batches between stages; none of them knows what a stage does.

``run(cfg)`` picks the engine named by ``cfg.engine``. Beam and Ray are optional extras and are
imported only when asked for.
"""

from __future__ import annotations

from typing import Any

from vesl.errors import UserError
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines.runtime_logs import import_notices_dropped


def _missing(extra: str, what: str, exc: ModuleNotFoundError) -> UserError:
    if (exc.name or "").startswith("vesl."):
        return UserError(f"the {extra} engine is not part of this vesl build: use --engine local")
    return UserError(f"the {extra} engine needs {what} ({exc.name} is missing): pip install 'vesl[{extra}]'")


def run(cfg: LabelConfig, progress: bool = True) -> dict[str, Any]:
    """Run a labeling job on the engine ``cfg.engine``; returns the engine's summary dict.

    The output directory is checked first and locked for the whole job (one writer per output).
    """
    from vesl.pipeline.job import check_job
    from vesl.pipeline.lock import output_lock

    check_job(cfg)
    with output_lock(cfg.output):
        return _run(cfg, progress)


def _run(cfg: LabelConfig, progress: bool) -> dict[str, Any]:
    if cfg.engine == "local":
        from vesl.pipeline.engines.local import run_local

        return run_local(cfg, progress=progress)
    if cfg.engine == "beam":
        try:
            with import_notices_dropped():
                from vesl.pipeline.engines.beam_engine import run_beam
        except ModuleNotFoundError as exc:
            raise _missing("beam", "Apache Beam", exc) from None
        return run_beam(cfg, progress=progress)
    if cfg.engine == "ray":
        try:
            from vesl.pipeline.engines.ray_engine import run_ray
        except ModuleNotFoundError as exc:
            raise _missing("ray", "Ray Data", exc) from None
        return run_ray(cfg, progress=progress)
    raise UserError(f"unknown engine {cfg.engine!r}: use local, beam or ray")
