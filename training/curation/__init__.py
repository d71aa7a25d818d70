"""Data curation: turn raw example files into a clean, deduplicated, PII-scrubbed chat dataset.

Owns `CurationConfig`, `curate()` (read → validate → scrub PII → chat template → length → exact and
near duplicates → contamination against eval test sets → deterministic train/validation split), the
report it writes (`report.json`, `report.html`), `dataset_hash()` and `read_test_texts()`. May import
`guardrails` (`guardrails.pii` scrubs the data) and `core` (`core.io` reads and writes the files),
never `gateway`, `evalsuite`, `bench` or `tunegate`.

Input files are read in the order given; each is auto-detected as OpenAI chat JSONL
(`{"messages": [...]}`), prompt/completion JSONL (`{"prompt": ..., "completion": ...}`) or an
Alpaca JSON array (`[{"instruction", "input", "output"}, ...]`) and normalised to chat `messages`.
A bad row is rejected with a rule name, a message and its line number, never a crash.

The modules, in import order: `rules` (rule names, rejections, the checks), `readers` (input
formats, test texts), `config` (`CurationConfig`), `report` (the HTML page, from the Jinja2
template `report.html.j2`) and `pipeline` (`curate`, `CurationReport`, `dataset_hash`).
"""

from training.curation.config import CurationConfig
from training.curation.pipeline import REPORT_FILES, CurationReport, StepCount, curate, dataset_hash
from training.curation.readers import FORMATS, read_test_texts
from training.curation.report import render_html
from training.curation.rules import RULES, Rejection

__all__ = [
    "FORMATS",
    "REPORT_FILES",
    "RULES",
    "CurationConfig",
    "CurationReport",
    "Rejection",
    "StepCount",
    "curate",
    "dataset_hash",
    "read_test_texts",
    "render_html",
]
