"""Model ids: families, provider extras and keys, resolution."""

from __future__ import annotations

import pytest
from pydantic_ai.exceptions import UserError
from pydantic_ai.models.function import FunctionModel

from patinox.agents import is_simulated, resolve_model, validate_model_id
from patinox.agents import models as models_module
from patinox.errors import UnknownModel


@pytest.mark.parametrize("model_id", ["simulated", "simulated:instant", "simulated:ttft_ms=20,tpot_ms=1"])
def test_simulated_ids_are_valid_and_resolve(model_id: str) -> None:
    validate_model_id(model_id)
    model = resolve_model(model_id)
    assert isinstance(model, FunctionModel)
    assert model.model_name == model_id
    assert is_simulated(model_id)


@pytest.mark.parametrize(
    "model_id",
    [
        "",
        "gpt-4o",
        "foo:bar",
        "simulatedx",
        "openai",
        "openai:",
        "openai: gpt-4o",
        "anthropic:-x",
        "openai:" + "a" * 201,
        "test",
        "google:gemini-2.0",
    ],
)
def test_unknown_ids(model_id: str) -> None:
    with pytest.raises(UnknownModel) as info:
        validate_model_id(model_id)
    assert info.value.http_status == 422
    assert repr(model_id) in info.value.message
    assert not is_simulated(model_id)


@pytest.mark.parametrize(("family", "extra"), [("openai", "openai"), ("anthropic", "anthropic")])
def test_provider_without_its_extra_names_the_pip_extra(
    monkeypatch: pytest.MonkeyPatch, family: str, extra: str
) -> None:
    monkeypatch.setattr(models_module, "_installed", lambda module: False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    with pytest.raises(UnknownModel) as info:
        validate_model_id(f"{family}:some-model")
    assert f"pip install 'patinox[{extra}]'" in info.value.message
    assert info.value.fields["missing_extra"] == extra


@pytest.mark.parametrize(
    ("family", "env"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")]
)
def test_provider_without_a_key(monkeypatch: pytest.MonkeyPatch, family: str, env: str) -> None:
    monkeypatch.setattr(models_module, "_installed", lambda module: True)
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(UnknownModel) as info:
        resolve_model(f"{family}:some-model")
    assert "no provider key configured" in info.value.message
    assert info.value.fields["key_env"] == env


def test_provider_refused_by_pydantic_ai_is_unknown_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(model_id: str) -> None:
        raise UserError(f"cannot build {model_id}")

    monkeypatch.setattr(models_module, "_installed", lambda module: True)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setattr(models_module, "infer_model", refuse)
    models_module._provider_model.cache_clear()
    try:
        with pytest.raises(UnknownModel) as info:
            resolve_model("openai:gpt-4o-refused")
    finally:
        models_module._provider_model.cache_clear()
    assert isinstance(info.value.__cause__, UserError)


def test_is_simulated() -> None:
    assert is_simulated("simulated")
    assert is_simulated("simulated:anything")  # family only; parameters are validated elsewhere
    assert not is_simulated("openai:simulated")
