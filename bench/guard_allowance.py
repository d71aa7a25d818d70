"""How much of a faithful answer the context does not contain, measured: `tunegate bench guard-allowance`.

The grounding detector's `PARAPHRASE_ALLOWANCE` (`guardrails.detectors.grounding`) is the share of
content words a faithful answer may leave unmatched: what the calibration relies on for answers
longer than those it was fitted on. This measures it where it may be measured: on the human-labelled
faithful rows (`hallucinated: false`) of the training folders, the same seeded mix the learned
grounding model trains on (`guardrails.grounding_training.training_mix`, default recipe); the dev sets
are never read. Per source and pooled: rows, the quartiles of the unsupported share (content words in
neither the context nor the question, as the detector counts them), and for contrast the hallucinated
rows' median.

Prints one JSON object; writes `guard_allowance.json` and `guard_allowance.png` (the faithful rows'
share per source, a box each, the allowance as a line) to `--out`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/out/guard")


def _quartiles(values: list[float]) -> list[float] | None:
    import numpy as np

    return [round(float(q), 3) for q in np.percentile(values, [25, 50, 75])] if values else None


def run(data_dir: Path, out: Path = DEFAULT_OUT) -> dict[str, Any]:
    import numpy as np

    from guardrails.detectors.grounding import PARAPHRASE_ALLOWANCE, grounding
    from guardrails.grounding_model import Recipe
    from guardrails.grounding_training import training_files, training_mix
    from guardrails.guard import check_input

    shares: dict[str, dict[bool, list[float]]] = defaultdict(lambda: {False: [], True: []})
    for row in training_mix(training_files(data_dir), Recipe()):
        evidence = grounding(check_input(row)).evidence
        if evidence.get("words"):
            shares[str(row.get("source") or "?")][bool(row["hallucinated"])].append(
                evidence["unsupported_words"] / evidence["words"]
            )
    faithful = [s for by in shares.values() for s in by[False]]
    result = {
        "measured_on": f"faithful rows of the training folders under {data_dir} (the grounding model's training mix)",
        "allowance": PARAPHRASE_ALLOWANCE,
        "pooled": {"rows": len(faithful), "quartiles": _quartiles(faithful)},
        "share_faithful_at_or_below_allowance": round(float(np.mean(np.array(faithful) <= PARAPHRASE_ALLOWANCE)), 3)
        if faithful
        else None,
        "per_source": {
            source: {
                "faithful_rows": len(by[False]),
                "faithful_quartiles": _quartiles(by[False]),
                "hallucinated_median": round(float(np.median(by[True])), 3) if by[True] else None,
            }
            for source, by in sorted(shares.items())
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(_plot(shares, PARAPHRASE_ALLOWANCE, out / "guard_allowance.png"))
    (out / "guard_allowance.json").write_text(json.dumps(result, indent=2))
    return result


def _plot(shares, allowance: float, path: Path) -> Path:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    sources = sorted(s for s in shares if shares[s][False])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.boxplot([shares[s][False] for s in sources], showfliers=False)
    ax.set_xticks(range(1, len(sources) + 1), sources, rotation=35, ha="right")
    ax.axhline(allowance, color="tab:red", linestyle="--", label=f"PARAPHRASE_ALLOWANCE {allowance}")
    ax.set_ylabel("unsupported share of content words")
    ax.set_title("Faithful answers of the training folders: what the context does not contain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
