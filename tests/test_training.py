"""Adapter training: config round trip and errors, LoRA and prefix runs into the registry and the
database, resume after a kill, QLoRA's clear refusal on a CPU, and vLLM/peft parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.settings import load_settings
from training.domain import Domain
from training.sft import TrainConfig, TrainingError, train_adapter

from .conftest import REPO


def write_chat(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    domain = Domain()
    rows = domain.qa_examples(domain.new_facts[:20])  # 80 rows
    folder = tmp_path_factory.mktemp("data")
    return write_chat(folder / "train.jsonl", rows[:64]), write_chat(folder / "validation.jsonl", rows[64:])


def settings_for(tmp_path: Path, base_model_dir: Path):
    return load_settings(None, var_dir=tmp_path / "var", base_model={"path": str(base_model_dir)})


def test_config_round_trip_and_hash(tmp_path):
    config = TrainConfig(name="support", train_file=Path("a.jsonl"), r=8, target_modules=["q_proj", "v_proj"])
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config and again.config_hash() == config.config_hash()
    assert TrainConfig.from_dict(config.to_dict() | {"seed": 1}).config_hash() != config.config_hash()
    path = tmp_path / "run.yaml"
    path.write_text("name: support\ntrain_file: data/train.jsonl\nr: 8\n")
    assert TrainConfig.from_yaml(path).train_file == tmp_path / "data" / "train.jsonl"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "train_file": "a", "rank": 4}, "unknown training setting.*`rank`"),
        ({"train_file": "a"}, "missing `name`"),
        ({"name": "x", "train_file": "a", "r": 0}, "`r` is 0"),
        ({"name": "x", "train_file": "a", "method": "ia3"}, "`method`"),
        ({"name": "x", "train_file": "a", "lora_dropout": 1.5}, "`lora_dropout`"),
        ({"name": "x", "train_file": "a", "target_modules": []}, "`target_modules`"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


def test_qlora_refuses_clearly_without_a_gpu(tmp_path, small_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: QLoRA is allowed here")
    config = TrainConfig(name="q", train_file=small_data[0], method="qlora")
    with pytest.raises(TrainingError, match="needs a CUDA GPU"):
        train_adapter(config, tmp_path, tmp_path)


def test_missing_train_file_is_a_clear_error(tmp_path, base_model_dir):
    config = TrainConfig(name="x", train_file=tmp_path / "nope.jsonl")
    with pytest.raises(TrainingError, match="`train_file`.*does not exist"):
        train_adapter(config, base_model_dir, tmp_path)


@pytest.mark.slow
def test_lora_trains_publishes_and_records(tmp_path, base_model_dir, small_data, capsys):
    from sqlalchemy import select

    from core.db import Adapter, make_engine, session_factory
    from training.workflow import train_and_register

    settings = settings_for(tmp_path, base_model_dir)
    config = TrainConfig(
        name="support", train_file=small_data[0], validation_file=small_data[1], max_steps=20, eval_steps=10,
        batch_size=16, r=8,
    )  # fmt: skip
    summary = train_and_register(settings, config, progress=False)
    err = capsys.readouterr().err  # progress=False: a caller telling its own story (the demo); we print nothing
    assert "trainable params:" not in err and "{'loss'" not in err
    assert summary["version"] == "v1" and summary["servable"] is True
    assert 0 < summary["trainable_fraction"] < 0.2 and summary["metrics"]["steps"] == 20
    adapter = settings.var_dir / "adapters" / "support" / "v1"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["config_hash"] == config.config_hash() and manifest["seed"] == 0
    assert manifest["base_model_hash"] and manifest["dataset_hash"] and "eval_loss" in manifest["metrics"]
    assert (adapter / "adapter_model.safetensors").exists()
    with session_factory(make_engine(settings.database_url))() as session:
        row = session.scalars(select(Adapter)).one()
    assert (row.name, row.version, row.servable) == ("support", 1, True)


@pytest.mark.slow
def test_prefix_tuning_trains_but_is_not_servable(tmp_path, base_model_dir, small_data):
    from training.workflow import train_and_register

    settings = settings_for(tmp_path, base_model_dir)
    config = TrainConfig(name="prefix", train_file=small_data[0], method="prefix", max_steps=5, batch_size=16)
    summary = train_and_register(settings, config, progress=False)
    assert summary["servable"] is False
    assert "prefix tuning" in summary["unservable_reason"] and "LoRA" in summary["unservable_reason"]


@pytest.mark.slow
def test_resumes_from_last_checkpoint_after_a_kill(tmp_path, base_model_dir, small_data):
    run = tmp_path / "run.yaml"
    run.write_text(
        f"name: resumed\ntrain_file: {small_data[0]}\nmax_steps: 60\neval_steps: 10\nbatch_size: 8\n"
        f"run_dir: {tmp_path / 'run'}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env |= {"TUNEGATE_VAR_DIR": str(tmp_path / "var"), "TUNEGATE_BASE_MODEL__PATH": str(base_model_dir)}
    cmd = [sys.executable, "-m", "tunegate.cli", "train", "--config", str(run), "--json"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-20" / "trainer_state.json").exists():  # saved in full (it is last)
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "var" / "adapters" / "resumed").exists()  # nothing half-published

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] and int(summary["resumed_from"].split("-")[1]) >= 20
    assert summary["metrics"]["steps"] == 60 and summary["version"] == "v1"


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_and_peft_answer_alike(tmp_path, base_model_dir, small_data, vllm_server):
    """Greedy answers of one adapter served by vLLM equal those of transformers + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.vllm import chat_greedy, load_adapter

    config = TrainConfig(name="parity", train_file=small_data[0], max_steps=40, batch_size=16, seed=3)
    result = train_adapter(config, base_model_dir, tmp_path)
    domain = Domain()
    facts = domain.new_facts[:20] + domain.old_facts[:20]
    conversations = [[{"role": "user", "content": f.heldout_questions[0]}] for f in facts]

    load_adapter(vllm_server.url, "parity", result.adapter_dir.resolve())
    served = chat_greedy(vllm_server.url, "parity", conversations, max_tokens=16)

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), result.adapter_dir)
    model.eval()
    local = []
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        local.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert served == local
    # the adapter changed something: it is not the base model answering
    base = chat_greedy(vllm_server.url, "base", conversations[:20], max_tokens=16)
    assert served[:20] != base


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")} | {"TUNEGATE_VAR_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "tunegate.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_data_curate_cli_writes_the_set_and_its_report(tmp_path, base_model_dir):
    domain = Domain()
    rows = domain.qa_examples(domain.new_facts[:10])
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows + rows[:3]) + "not json\n")
    test_set = tmp_path / "test.jsonl"
    test_set.write_text(json.dumps({"question": rows[0]["messages"][0]["content"]}) + "\n")
    proc = _cli(tmp_path, "data", "curate", str(raw), "--out", str(tmp_path / "out"), "--tokenizer",
                str(base_model_dir), "--test-set", str(test_set), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["rejected_by_rule"]["json"] == 1 and report["rejected_by_rule"]["exact_duplicate"] == 3
    assert report["rejected_by_rule"]["contamination"] == 1 and report["summary"]["kept"] == 39
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "train.jsonl").exists()
    missing = _cli(tmp_path, "data", "curate", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "not found" in missing.stderr


@pytest.mark.slow
def test_adapters_cli_lists_and_shows(tmp_path, base_model_dir, small_data):
    from training.workflow import train_and_register

    settings = settings_for(tmp_path, base_model_dir)
    train_and_register(settings, TrainConfig(name="cli", train_file=small_data[0], max_steps=2, batch_size=16),
                       progress=False)  # fmt: skip
    listed = json.loads(_cli(tmp_path / "var", "adapters", "list", "--json").stdout)
    assert [(m["name"], m["version"], m["servable"]) for m in listed] == [("cli", "v1", True)]
    shown = _cli(tmp_path / "var", "adapters", "show", "cli")
    assert json.loads(shown.stdout)["config_hash"] == listed[0]["config_hash"]
    assert _cli(tmp_path / "var", "adapters", "show", "nope").returncode == 2


def test_resume_skips_a_checkpoint_a_kill_cut_short(tmp_path):
    """A kill while a checkpoint is saved leaves its folder without (or with half of) trainer_state.json;
    resuming from it fails, so the run resumes from the newest complete one (transformers'
    get_last_checkpoint goes by folder names alone and picks the broken one)."""
    from transformers.trainer_utils import get_last_checkpoint

    from training.sft import last_complete_checkpoint

    for step, state in ((10, '{"global_step": 10}'), (20, None), (30, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-30")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path / "nothing") is None
