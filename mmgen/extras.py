"""Optional dependencies: the web chat, plots and experiment tracking are extras of the package.

The model, data and training need none of them, so `pip install mmgen` leaves them out and
`pip install 'mmgen[web,plots,tracking]'` (or `.[dev]` in a checkout) adds them. Code that needs one
imports it through `require`, at the point of use, so that a missing extra is a one-line error naming
what needed it and the install command, not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmgen.cli import UsageError

# module -> the extra of pyproject.toml that installs it
EXTRAS = {"gradio": "web", "matplotlib": "plots", "tensorboard": "tracking"}


class MissingExtraError(UsageError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_extra_message(module: str, needed_by: str) -> str:
    extra = EXTRAS[module]
    return f"{needed_by} needs the '{extra}' extra ({module} is not installed): pip install 'mmgen[{extra}]'"


def require(module: str, needed_by: str) -> ModuleType:
    """`module` imported, or `MissingExtraError` when it is not installed. `needed_by` names the feature or
    setting that asked for it ("the web chat", "run.tracker=tensorboard")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the extra is there but one of its own dependencies is broken: a real error
            raise
        raise MissingExtraError(missing_extra_message(module, needed_by)) from None


def pyplot(needed_by: str) -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or `MissingExtraError`."""
    matplotlib = require("matplotlib", needed_by)
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
