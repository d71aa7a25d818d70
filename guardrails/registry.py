"""The detector registry: detectors keyed by name, filled explicitly in `default_registry()`.

Owns the names the settings use (`guardrails.detectors`) and how each detector is built from
`GuardrailSettings`. Registering a name twice is an error; nothing registers itself on import, and
heavy detectors (models, clients) import their libraries only when built, and `build_detectors(...,
only=...)` builds just the detectors the guard's risk model weighs. Imports `core.settings`
and `guardrails.types` (detector modules lazily).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from core.settings import GuardrailSettings
from guardrails.types import Detector

logger = logging.getLogger(__name__)
Factory = Callable[[GuardrailSettings], Detector]


class RegistryError(ValueError):
    """A duplicate name, an unknown name or a detector its settings cannot build."""


class DetectorUnavailable(RegistryError):
    """A configured detector whose model is not built (yet): the guard runs without it and says so once."""


_said: set[str] = set()  # what `build_detectors` has already said about unavailable detectors


class Registry:
    """Detector factories by name."""

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, factory: Factory, help: str = "") -> None:
        if name in self._factories:
            raise RegistryError(f"a detector named `{name}` is already registered; pick another name")
        self._factories[name] = factory
        self._help[name] = help

    def names(self) -> list[str]:
        return list(self._factories)

    def describe(self) -> dict[str, str]:
        return dict(self._help)

    def check(self, name: str) -> None:
        if name not in self._factories:
            raise RegistryError(
                f"unknown detector `{name}` in `guardrails.detectors`; known: {', '.join(self._factories)}"
            )

    def build(self, name: str, settings: GuardrailSettings) -> Detector:
        self.check(name)
        return self._factories[name](settings)


def _grounding(_: GuardrailSettings) -> Detector:
    from guardrails.detectors.grounding import grounding

    return grounding


def _embedding(_: GuardrailSettings) -> Detector:
    from guardrails.detectors.embedding import EmbeddingDetector

    return EmbeddingDetector()


def _uncertainty(_: GuardrailSettings) -> Detector:
    from guardrails.detectors.uncertainty import uncertainty

    return uncertainty


def _consistency(_: GuardrailSettings) -> Detector:
    from guardrails.detectors.consistency import consistency

    return consistency


def _nli(settings: GuardrailSettings) -> Detector:
    from guardrails.detectors.nli import NLIDetector

    if settings.nli_model_path is None:
        raise RegistryError("detector `nli` needs `guardrails.nli_model_path` (a local classifier folder)")
    return NLIDetector(settings.nli_model_path)


def _grounding_model(settings: GuardrailSettings) -> Detector:
    from pathlib import Path

    path = settings.grounding_model_path or Path("var/models/grounding-current")
    if not (Path(path) / "recipe.json").is_file():
        raise DetectorUnavailable(
            f"detector `grounding_model` is not built ({path} holds no model): the guard runs without it; "
            "build it with `tunegate guard train-detector`"
        )
    from guardrails.detectors.grounding_model import GroundingModelDetector

    return GroundingModelDetector(path, budget_ms=settings.check_budget_ms)


def _judge(settings: GuardrailSettings) -> Detector:
    from guardrails.detectors.judge import JudgeDetector

    if not settings.judge_url:
        raise RegistryError("detector `judge` needs `guardrails.judge_url` (an OpenAI-compatible endpoint)")
    return JudgeDetector(settings.judge_url, settings.judge_model or "judge", settings.judge_api_key)


def default_registry() -> Registry:
    """Every detector tunegate ships, in one place."""
    registry = Registry()
    registry.register("grounding", _grounding, "lexical, entity and number support of each sentence")
    registry.register("embedding", _embedding, "MiniLM cosine to the best context sentence")
    registry.register("uncertainty", _uncertainty, "token probabilities and entropy from vLLM logprobs")
    registry.register("consistency", _consistency, "agreement with extra samples (exact match, token F1)")
    registry.register("nli", _nli, "a local NLI / hallucination classifier")
    registry.register("grounding_model", _grounding_model, "a MiniLM token classifier: each claim against the context")
    registry.register("judge", _judge, "an LLM judge behind an OpenAI-compatible endpoint")
    return registry


def build_detectors(
    settings: GuardrailSettings, registry: Registry | None = None, only: Collection[str] | None = None
) -> dict[str, Detector]:
    """The detectors `settings.detectors` names, built, in that order. With `only`, just those of them
        are built: the others are checked to be known names, but a model nobody reads is never loaded. A
    detector whose model is not built (`DetectorUnavailable`) is left out, with one warning per process."""
    registry = registry or default_registry()
    if len(set(settings.detectors)) != len(settings.detectors):
        raise RegistryError(f"`guardrails.detectors` names a detector twice: {settings.detectors}")
    for name in settings.detectors:
        registry.check(name)
    built = {}
    for name in settings.detectors:
        if only is not None and name not in only:
            continue
        try:
            built[name] = registry.build(name, settings)
        except DetectorUnavailable as err:
            if str(err) not in _said:  # once per process, not once per guard
                _said.add(str(err))
                logger.warning("%s", err)
    return built
