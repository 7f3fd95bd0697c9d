"""Finding the user's App from a ``module:attribute`` string."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from wsgate.worker.app import App
from wsgate.worker.errors import AppLoadError


def load_app(spec: str, *, app_dir: Path | None = None) -> App:
    """Import ``module:attribute`` and return the App it names.

    ``app_dir`` (like uvicorn's ``--app-dir``) is put first on ``sys.path`` so that an
    app next to the user's working directory imports without installing it. Raises
    AppLoadError with the reason.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AppLoadError(f"app must be given as module:attribute, got {spec!r}")
    if app_dir is not None and str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(f"cannot import app module {module_name!r}: {exc}") from exc
    app: object = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError as exc:
            raise AppLoadError(f"module {module_name!r} has no attribute {attribute!r}") from exc
    if not isinstance(app, App):
        raise AppLoadError(f"{spec} is a {type(app).__name__}, not a worker.App")
    return app
