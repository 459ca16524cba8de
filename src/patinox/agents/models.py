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
reads the key from the same environment variable: the deployment's shared key. A tenant
that stored its own provider key (BYOK, the secret ``provider:<family>``) has its runs'
model built with that key instead (``resolve_model(model_id, api_key=...)``), on the host
side only: the key is never sent to an execution process.
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


def validate_model_id(model_id: str, *, tenant_key: bool = False) -> None:
    """Check that ``model_id`` names a model this deployment can run now.

    Args:
        tenant_key: the tenant has its own key for the model's provider (BYOK), so the
            deployment's shared key need not be configured.

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
    if not tenant_key and not os.environ.get(family.key_env):
        raise UnknownModel(
            f"model {model_id!r}: no provider key configured (set {family.key_env})",
            model=model_id,
            key_env=family.key_env,
        )


def resolve_model(model_id: str, *, api_key: str | None = None) -> Model:
    """The pydantic-ai model for ``model_id``, validated first.

    Simulated models are built per call (microseconds); provider models are cached per id
    (and per tenant key), so their HTTP clients are reused across runs.

    Args:
        api_key: the tenant's own provider key (BYOK); ``None``: the deployment's shared
            key from the environment. Host side only.

    Returns:
        A :class:`pydantic_ai.models.Model`.

    Raises:
        UnknownModel: as :func:`validate_model_id`, or pydantic-ai refused the id (chained;
            with a tenant key, the message names only the error's type, never the key).
    """
    validate_model_id(model_id, tenant_key=api_key is not None)
    if is_simulated(model_id):
        return simulated_model(model_id)
    if api_key is not None:
        return _provider_model_with_key(model_id, api_key)
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


@functools.lru_cache(maxsize=256)
def _provider_model_with_key(model_id: str, api_key: str) -> Model:
    from pydantic_ai.providers import Provider, infer_provider_class

    def provider(name: str) -> Provider[object]:
        return infer_provider_class(name)(api_key=api_key)  # type: ignore[call-arg]

    try:
        return infer_model(model_id, provider_factory=provider)
    except Exception as exc:  # as _provider_model; the text of exc is left out: it might quote the key
        raise UnknownModel(
            f"model {model_id!r} could not be set up with the tenant's provider key: {type(exc).__name__}",
            model=model_id,
        ) from None
