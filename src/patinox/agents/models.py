"""Model ids: validation and resolution to pydantic-ai model objects.

Grammar of a model id::

    simulated[:<params>]      the offline simulated model (always available; see
                              patinox.agents.simulated for <params>: "instant" or
                              "ttft_ms=<n>,tpot_ms=<n>")
    openai:<model-name>       needs the extra  pip install 'patinox[openai]'
                              and the environment variable OPENAI_API_KEY
    anthropic:<model-name>    needs the extra  pip install 'patinox[anthropic]'
                              and the environment variable ANTHROPIC_API_KEY

``<model-name>`` is the provider's own name (e.g. ``gpt-4o``, ``claude-sonnet-4-5``): letters,
digits and ``. _ - : /``, starting with a letter or digit, at most 200 characters.
Provider models are built by pydantic-ai (:func:`pydantic_ai.models.infer_model`), which
reads the key from the same environment variable.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Final

from pydantic_ai.models import Model, infer_model

from patinox.agents.simulated import is_simulated, parse_simulated_model_id, simulated_model
from patinox.errors import UnknownModel

__all__ = ["PROVIDERS", "ProviderFamily", "is_simulated", "resolve_model", "validate_model_id"]


@dataclass(frozen=True, kw_only=True)
class ProviderFamily:
    """A model provider reachable through pydantic-ai.

    Attributes:
        prefix: the model id prefix before ``:``.
        module: the Python package the pydantic-ai extra installs.
        extra: the Patinox pip extra that installs it.
        key_env: the environment variable holding the provider API key.
    """

    prefix: str
    module: str
    extra: str
    key_env: str


PROVIDERS: Final[dict[str, ProviderFamily]] = {
    "openai": ProviderFamily(prefix="openai", module="openai", extra="openai", key_env="OPENAI_API_KEY"),
    "anthropic": ProviderFamily(
        prefix="anthropic", module="anthropic", extra="anthropic", key_env="ANTHROPIC_API_KEY"
    ),
}

_MODEL_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")


def validate_model_id(model_id: str) -> None:
    """Check that ``model_id`` names a model this deployment can run now.

    Raises:
        UnknownModel: unknown family or malformed id; a provider whose package is not
            installed (the message names ``pip install 'patinox[<extra>]'``, field
            ``missing_extra``); or a provider with no key configured (field ``key_env``).
    """
    if is_simulated(model_id):
        parse_simulated_model_id(model_id)
        return
    family = _provider_family(model_id)
    if not _installed(family.module):
        raise UnknownModel(
            f"model {model_id!r} needs the {family.prefix} provider, which is not installed: "
            f"pip install 'patinox[{family.extra}]'",
            model=model_id,
            missing_extra=family.extra,
        )
    if not os.environ.get(family.key_env):
        raise UnknownModel(
            f"model {model_id!r}: no provider key configured (set {family.key_env})",
            model=model_id,
            key_env=family.key_env,
        )


def resolve_model(model_id: str) -> Model:
    """The pydantic-ai model for ``model_id``, validated first.

    Simulated models are built per call (microseconds); provider models are cached per id,
    so their HTTP clients are reused across runs.

    Returns:
        A :class:`pydantic_ai.models.Model`.

    Raises:
        UnknownModel: as :func:`validate_model_id`, or pydantic-ai refused the id (chained).
    """
    validate_model_id(model_id)
    if is_simulated(model_id):
        return simulated_model(model_id)
    return _provider_model(model_id)


def _installed(module: str) -> bool:
    """Whether the top-level package ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def _provider_family(model_id: str) -> ProviderFamily:
    prefix, sep, name = model_id.partition(":")
    family = PROVIDERS.get(prefix) if sep else None
    if family is None:
        raise UnknownModel(
            f"unknown model {model_id!r}; model ids are 'simulated', 'simulated:instant', "
            "'simulated:ttft_ms=<n>,tpot_ms=<n>', 'openai:<name>' or 'anthropic:<name>'",
            model=model_id,
        )
    if not _MODEL_NAME.fullmatch(name):
        raise UnknownModel(
            f"bad model id {model_id!r}: the model name after '{prefix}:' must be 1-200 "
            "letters, digits or . _ - : / and start with a letter or digit",
            model=model_id,
        )
    return family


@functools.lru_cache(maxsize=64)
def _provider_model(model_id: str) -> Model:
    try:
        return infer_model(model_id)
    except Exception as exc:  # pydantic-ai UserError, ImportError, provider client errors
        raise UnknownModel(f"model {model_id!r} could not be set up: {exc}", model=model_id) from exc
