"""`evalsuite.export`: a test set as an lm-evaluation-harness task, and that task run by the real `lm_eval`
(`local-chat-completions`) against a real gateway in front of a real vLLM, scored the way tunegate scores
the same rows itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from evalsuite.export import REGEXES_TO_IGNORE, ExportResult, chat_completions_url, export_lm_eval
from training.fact_eval import normalise

REPO = Path(__file__).resolve().parents[1]


def lm_eval_bin() -> Path:
    """lm_eval lives in the project's venv, beside the interpreter running the tests."""
    return Path(sys.executable).parent / "lm_eval"


def row(i: int, question: str = "What is the unit rate of tariff T123?", answer: str = "0.213 EUR/kWh") -> dict:
    return {"id": f"r{i}", "messages": [{"role": "user", "content": question}], "answer": answer}


# --- the files -------------------------------------------------------------------------------------------


def test_export_writes_a_yaml_naming_its_jsonl(tmp_path):
    rows = [row(0), row(1, "Is T9 green?", "yes"), row(2)]
    result = export_lm_eval(rows, tmp_path / "out", "tg.facts-v1", description="Answer briefly.")
    assert result.rows == 3 and result.task == "tg.facts-v1"
    assert result.yaml_path == (tmp_path / "out" / "tg.facts-v1.yaml").resolve()
    assert result.jsonl_path == (tmp_path / "out" / "tg.facts-v1.jsonl").resolve()
    config = yaml.safe_load(result.yaml_path.read_text())
    assert config["task"] == "tg.facts-v1"
    assert config["dataset_path"] == "json"
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == result.jsonl_path
    assert config["test_split"] == "test" and config["output_type"] == "generate_until"
    assert config["doc_to_text"] == "prompt" and config["doc_to_target"] == "answer"
    assert config["generation_kwargs"]["until"] == [] and config["generation_kwargs"]["temperature"] == 0
    [metric] = config["metric_list"]
    assert metric["metric"] == "exact_match" and metric["ignore_case"] and not metric["ignore_punctuation"]
    docs = [json.loads(line) for line in result.jsonl_path.read_text().splitlines()]
    assert [d["id"] for d in docs] == ["r0", "r1", "r2"]
    assert docs[1] == {
        "id": "r1",
        "messages": [{"role": "user", "content": "Is T9 green?"}],
        "answer": "yes",
        "system": "Answer briefly.",
        "prompt": "Is T9 green?",  # one question: sent verbatim, as the only user turn
    }
    from core.io import sha256_file

    assert result.sha256 == sha256_file(result.jsonl_path) and result.yaml_sha256 == sha256_file(result.yaml_path)
    assert not [p for p in result.out_dir.iterdir() if p.name.startswith(".")]  # no temp file left behind
    again = export_lm_eval(rows, tmp_path / "out", "tg.facts-v1", description="Answer briefly.")
    assert again.sha256 == result.sha256  # deterministic


def test_multi_turn_rows_are_flattened_and_system_turns_become_the_system_prompt(tmp_path):
    conversation = {
        "id": "c",
        "messages": [
            {"role": "system", "content": "You are Northwind's assistant."},
            {"role": "user", "content": "Tell me about T123."},
            {"role": "assistant", "content": "T123 is a fixed tariff."},
            {"role": "user", "content": "Its unit rate?"},
        ],
        "answer": "0.213 EUR/kWh",
    }
    result = export_lm_eval([conversation], tmp_path, "conv")
    [doc] = [json.loads(line) for line in result.jsonl_path.read_text().splitlines()]
    assert doc["system"] == "You are Northwind's assistant."
    assert doc["prompt"] == "User: Tell me about T123.\n\nAssistant: T123 is a fixed tariff.\n\nUser: Its unit rate?"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "answer": "x"}], "row 0: `messages`"),
        ([row(0), {"id": "b", "messages": [{"role": "user", "content": "q"}]}], "row 1: `answer`"),
        ([row(0), row(1, answer="  ")], "row 1: `answer`"),
        ([{"id": "a", "messages": [], "answer": "x"}], "row 0: `messages`"),
        ([{"id": "a", "messages": [{"role": "bot", "content": "q"}], "answer": "x"}], r"row 0: `messages\[0\]\.role`"),
        ([{"id": "a", "messages": [{"role": "user", "content": None}], "answer": "x"}], r"messages\[0\]\.content"),
        (
            [
                {
                    "id": "a",
                    "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "answer": "x",
                }
            ],
            "row 0: `messages` must end with a user turn",
        ),
        ([row(0), row(1), row(0)], "row 2: `id` 'r0' repeats row 0"),
        ([row(0), "not a row"], "row 1: not an object"),
        ([], "no rows"),
    ],
)
def test_bad_rows_are_refused_naming_the_row_and_field(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        export_lm_eval(rows, tmp_path, "t")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("task", ["", "a b", "../up", "x/y", "t;rm", "é"])
def test_task_names_are_restricted(tmp_path, task):
    with pytest.raises(ValueError, match="task name"):
        export_lm_eval([row(0)], tmp_path, task)


def test_the_command_runs_local_chat_completions_against_the_gateway(tmp_path):
    result = export_lm_eval([row(0)], tmp_path, "facts")
    line = result.command("support", "http://10.0.0.5:8000", output_path=tmp_path / "res")
    assert line.startswith("lm_eval --model local-chat-completions --model_args model=support,")
    assert "base_url=http://10.0.0.5:8000/v1/chat/completions," in line
    assert "tokenized_requests=False" in line and "--apply_chat_template" in line
    assert f"--tasks facts --include_path {tmp_path.resolve()}" in line
    assert "--gen_kwargs temperature=0,max_gen_toks=16" in line
    assert "OPENAI_API_KEY" in ExportResult.command.__doc__
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"):
        assert chat_completions_url(url) == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError, match="model_args"):
        result.argv("a,b", "http://h:1")


# --- the metric is tunegate's normalise ------------------------------------------------------------------

PAIRS = [
    ("0.213 EUR/kWh", "0.213 EUR/kWh"),
    ("  0.213 eur/KWH.  ", "0.213 EUR/kWh"),
    ("0.213   EUR/kWh..", "0.213 EUR/kWh"),
    ("0.213 EUR/kWh .", "0.213 EUR/kWh"),  # tunegate keeps the space before a trailing dot: no match
    ("0213 EUR/kWh", "0.213 EUR/kWh"),  # punctuation matters
    ("0.213EUR/kWh", "0.213 EUR/kWh"),  # so does a space
    ("0.213 EUR", "0.213 EUR/kWh"),
    ("", "yes"),
    ("Yes.", "yes"),
    ("...", ""),
    ("T12 3", "T1 23"),
]


def lm_eval_style(text: str) -> str:
    """What lm_eval does to a string with the exported metric (re.sub of each regex, then lower())."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


@pytest.mark.parametrize(("got", "gold"), PAIRS)
def test_the_exported_normalisation_agrees_with_tunegates(got, gold):
    assert (lm_eval_style(got) == lm_eval_style(gold)) == (normalise(got) == normalise(gold))


def test_lm_evals_own_exact_match_with_the_exported_arguments_agrees_with_tunegates(tmp_path):
    metrics = pytest.importorskip("lm_eval.api.metrics")
    config = yaml.safe_load(export_lm_eval([row(0)], tmp_path, "t").yaml_path.read_text())
    [metric] = config["metric_list"]
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    for got, gold in PAIRS:
        got = got.strip()  # the `strip` filter (regex `(?s).*` strips what it keeps)
        score = metrics.exact_match_hf_evaluate(predictions=[got], references=[gold], **kwargs)["exact_match"]
        assert score == float(normalise(got) == normalise(gold)), (got, gold)


# --- the real thing: lm_eval -> gateway -> vLLM ----------------------------------------------------------


def wrong_answers(facts) -> list[tuple]:
    """Three facts paired with another fact's answer (a gold that the model cannot match)."""
    pairs = []
    for fact in facts:
        other = next(f for f in facts if normalise(f.answer) != normalise(fact.answer))
        pairs.append((fact, other.answer))
        if len(pairs) == 3:
            return pairs
    raise AssertionError("not enough distinct answers")


@pytest.mark.vllm
def test_lm_eval_scores_an_exported_set_through_the_gateway_as_tunegate_does(tmp_path, vllm_server):
    from core.db import make_engine, session_factory, session_scope, upgrade
    from core.keys import create_key
    from core.settings import load_settings
    from gateway.app import create_app
    from training.domain import Domain

    from .conftest import ServerThread

    binary = lm_eval_bin()
    assert binary.exists(), f"{binary} is missing: lm-eval[api] is a dev dependency (`make setup`)"
    settings = load_settings(
        None, var_dir=tmp_path / "var", vllm={"url": vllm_server.url}, guardrails={"enabled": False}
    )
    upgrade(settings.database_url)
    with session_scope(session_factory(make_engine(settings.database_url))) as session:
        key = create_key(session, "lm-eval", "app")[0]

    old = Domain().old_facts
    right = [(f, f.answer) for f in old[::25][:12]]
    wrong = wrong_answers(old[7::25])
    rows = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": fact.heldout_questions[0]}], "answer": gold}
        for i, (fact, gold) in enumerate(right + wrong)
    ]
    assert len(rows) == 15
    result = export_lm_eval(rows, tmp_path / "task", "tunegate_facts")

    with ServerThread(create_app(settings)) as gateway:
        # tunegate's own score of the same rows: the gateway asked directly, greedy, 16 tokens.
        direct = {}
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            for r in rows:
                body = {"model": "base", "messages": r["messages"], "temperature": 0, "max_tokens": 16}
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                direct[r["id"]] = response.json()["choices"][0]["message"]["content"]
        expected = sum(normalise(direct[r["id"]]) == normalise(r["answer"]) for r in rows) / len(rows)

        out = tmp_path / "results"
        argv = result.argv("base", gateway.url, output_path=out, lm_eval=str(binary), log_samples=True)
        env = os.environ | {
            "OPENAI_API_KEY": key,
            "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "TOKENIZERS_PARALLELISM": "false",
        }
        done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{shutil.which('lm_eval')}\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"

    [results_file] = out.rglob("results_*.json")
    score = json.loads(results_file.read_text())["results"]["tunegate_facts"][result.metric_key]
    print(f"lm_eval exact_match {score:.4f}, tunegate fact accuracy {expected:.4f} ({results_file})")
    assert 0.6 <= expected <= 12 / 15  # the base model knows old facts; the three wrong golds never match
    assert score == pytest.approx(expected, abs=1e-9)
    # The same prompt reached the model: lm_eval's raw answers are the ones the gateway gave directly.
    [samples_file] = out.rglob("samples_tunegate_facts_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    assert len(samples) == 15
    for sample in samples:
        assert sample["resps"][0][0] == direct[sample["doc"]["id"]], sample["doc"]["id"]
