"""Data curation: every rule fires on a row built to break it, PII is masked, the split is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrails.pii import PII_KINDS, iban_ok, luhn_ok, scrub
from training.curation import RULES, CurationConfig, curate, dataset_hash

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
RAISING_TEMPLATE = (
    "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('forbidden word') }}"
    "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
)


def make_tokenizer(chat_template: str | None = TEMPLATE):
    """A tiny word-level tokenizer trained in-process (no downloads), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["what is the capital of france paris spain madrid", "tell me a fact about animals cats dogs"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(out: Path) -> list[dict]:
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "validation.jsonl")


def user_texts(out: Path) -> list[str]:
    return [m["content"] for row in all_rows(out) for m in row["messages"] if m["role"] == "user"]


def by_rule(report, rule: str):
    return [r for r in report.rejections if r.rule == rule]


# ------------------------------------------------------------------------------------------ formats


def test_each_input_format_is_detected_and_normalised(tmp_path, tokenizer):
    chat_file = write_jsonl(tmp_path / "chat.jsonl", [chat("What is the capital of France?", "Paris.", "Be brief.")])
    pc_file = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is the capital of Spain?", "completion": "Madrid."}])
    alpaca_file = tmp_path / "alpaca.json"
    alpaca_file.write_text(
        json.dumps(
            [
                {"instruction": "Name a cat breed.", "input": "", "output": "Siamese."},
                {"instruction": "Translate to French.", "input": "dog", "output": "chien"},
            ],
            indent=2,
        )
    )
    report = curate([chat_file, pc_file, alpaca_file], tmp_path / "out", CurationConfig(), tokenizer=tokenizer)

    assert [i["format"] for i in report.inputs] == ["chat", "prompt_completion", "alpaca"]
    assert report.rejections == []
    rows = all_rows(tmp_path / "out")
    assert len(rows) == 4 and report.train_rows + report.validation_rows == 4
    by_user = {r["messages"][-2]["content"]: r["messages"] for r in rows}
    assert by_user["What is the capital of France?"][0] == {"role": "system", "content": "Be brief."}
    assert by_user["What is the capital of Spain?"][-1] == {"role": "assistant", "content": "Madrid."}
    assert by_user["Translate to French.\n\ndog"][-1]["content"] == "chien"
    assert by_user["Name a cat breed."] == [
        {"role": "user", "content": "Name a cat breed."},
        {"role": "assistant", "content": "Siamese."},
    ]
    assert report.length_unit == "tokens"


# ------------------------------------------------------------------------------------------ validation


def test_bad_rows_are_rejected_with_rule_and_line(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            chat("What is the capital of France?", "Paris."),  # 1 ok
            '{"messages": [ this is not json',  # 2 json
            {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]},  # 3
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]},  # 4 role
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}]},  # 5 empty
            {"messages": [{"role": "user", "content": "Only a question"}]},  # 6 no answer
            {"messages": [{"role": "system", "content": "Alone"}]},  # 7 system only
            {"messages": "not a list"},  # 8 schema
            {"prompt": "wrong format for this file", "completion": "x"},  # 9 schema (file is chat)
            [1, 2, 3],  # 10 schema: not an object
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 11
            '{"messages": [{"role": "user", "content": "bad \\ud800"}, '  # 12: lone surrogate
            '{"role": "assistant", "content": "x"}]}',
        ],
    )
    with path.open("ab") as fh:
        fh.write(b'{"messages": "\xff\xfe"}\n')  # 13: not UTF-8
    report = curate(path, tmp_path / "out", CurationConfig(), tokenizer=tokenizer)

    got = {(r.line, r.rule) for r in report.rejections}
    assert got == {
        (2, "json"),
        (3, "roles"),
        (4, "roles"),
        (5, "schema"),
        (6, "roles"),
        (7, "roles"),
        (8, "schema"),
        (9, "schema"),
        (10, "schema"),
        (11, "schema"),
        (12, "schema"),
        (13, "json"),
    }
    messages = {r.line: r.message for r in report.rejections}
    assert "alternate user, assistant" in messages[3]
    assert "'tool'" in messages[4]
    assert "empty" in messages[5]
    assert "`assistant`" in messages[6]
    assert "UTF-8" in messages[13]
    assert all(r.source == str(path) for r in report.rejections)
    assert len(all_rows(tmp_path / "out")) == 1


def test_broken_alpaca_array_reports_the_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(
        '[\n  {"instruction": "Name a dog breed.", "output": "Beagle."},\n'
        '  {"instruction": "No output here"},\n'
        '  {"instruction": "Broken", "output": \n'
        "]\n"
    )
    report = curate([path], tmp_path / "out", CurationConfig())
    assert [(r.rule, r.line) for r in report.rejections] == [("schema", 3), ("json", 5)]
    assert "the rest of the file was skipped" in report.rejections[1].message
    assert len(all_rows(tmp_path / "out")) == 1


# ------------------------------------------------------------------------------------------ template, length


def test_template_failure_rejects_only_that_row(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [chat("What is the capital of France?", "Paris."), chat("Say the FORBIDDEN word", "No.")],
    )
    report = curate(path, tmp_path / "out", CurationConfig(), tokenizer=make_tokenizer(RAISING_TEMPLATE))
    [rej] = by_rule(report, "template")
    assert rej.line == 2 and "forbidden word" in rej.message
    assert len(all_rows(tmp_path / "out")) == 1


def test_a_template_that_always_raises_rejects_everything_without_crashing(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), chat("c", "d")])
    report = curate(path, tmp_path / "out", CurationConfig(), tokenizer=make_tokenizer("{{ raise_exception('no') }}"))
    assert report.rejected_by_rule["template"] == 2
    assert all_rows(tmp_path / "out") == []


def test_tokenizer_without_chat_template_is_a_setup_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b")])
    with pytest.raises(ValueError, match="`chat_template`"):
        curate(path, tmp_path / "out", CurationConfig(), tokenizer=make_tokenizer(None))


def test_too_long_rows_are_rejected(tmp_path, tokenizer):
    long_answer = " ".join(["cats"] * 40)
    path = write_jsonl(tmp_path / "t.jsonl", [chat("Tell me a fact", "Cats nap."), chat("Tell me more", long_answer)])
    report = curate(path, tmp_path / "out", CurationConfig(max_tokens=30), tokenizer=tokenizer)
    [rej] = by_rule(report, "length")
    assert rej.line == 2 and "`max_tokens` 30" in rej.message and "tokens" in rej.message
    assert len(all_rows(tmp_path / "out")) == 1


# ------------------------------------------------------------------------------------------ duplicates

LONG = (
    "The quarterly tariff review covers residential and business plans, the standing charge for each "
    "region, the unit rate for peak and off peak hours, the discount for paperless billing, the fee for "
    "late payment, the grace period before disconnection, and the rules for moving house within the "
    "supply area, all of which take effect on the first day of the next billing cycle for every customer"
)


def test_exact_and_near_duplicates_are_removed(tmp_path, tokenizer):
    near = LONG.replace("late payment", "overdue payment")
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            chat("Summarise the tariff review.", LONG),  # 1 kept
            chat("  summarise THE tariff review. ", LONG.upper()),  # 2 exact dup after normalising
            chat("Summarise the tariff review.", near),  # 3 near dup
            chat("What is the capital of France?", "Paris."),  # 4 kept
            chat("What is the capital of Spain?", "Madrid."),  # 5 kept: similar, not near-dup
        ],
    )
    report = curate(path, tmp_path / "out", CurationConfig(max_tokens=500), tokenizer=tokenizer)
    [exact] = by_rule(report, "exact_duplicate")
    [near_rej] = by_rule(report, "near_duplicate")
    assert exact.line == 2 and "line 1" in exact.message
    assert near_rej.line == 3 and "line 1" in near_rej.message and "Jaccard" in near_rej.message
    assert len(all_rows(tmp_path / "out")) == 3

    # With a threshold above the pair's similarity, the near-duplicate stays.
    report = curate(path, tmp_path / "out2", CurationConfig(max_tokens=500, near_dup_threshold=0.99))
    assert report.rejected_by_rule["near_duplicate"] == 0
    report = curate(path, tmp_path / "out3", CurationConfig(max_tokens=500, near_dedup=False))
    assert report.rejected_by_rule["near_duplicate"] == 0 and report.rejected_by_rule["exact_duplicate"] == 1


# ------------------------------------------------------------------------------------------ PII

PII_TEXT = (
    "Write to jane.doe@example.com or call +44 20 7946 0958 or (555) 123-4567. "
    "Card 4111 1111 1111 1111 expires soon. SSN 123-45-6789, NI number AB 12 34 56 C, "
    "IBAN GB82 WEST 1234 5698 7654 32. Order reference 4111 1111 1111 1112 is not a card."
)


def test_pii_is_masked_and_counted(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [chat(PII_TEXT, "Noted, jane.doe@example.com."), chat("What is the capital of France?", "Paris.")],
    )
    report = curate(path, tmp_path / "out", CurationConfig(max_tokens=500), tokenizer=tokenizer)
    [row] = [r for r in all_rows(tmp_path / "out") if "[EMAIL]" in r["messages"][0]["content"]]
    user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    assert user == (
        "Write to [EMAIL] or call [PHONE] or [PHONE]. "
        "Card [CARD] expires soon. SSN [SSN], NI number [UK_NINO], "
        "IBAN [IBAN]. Order reference 4111 1111 1111 1112 is not a card."
    )
    assert answer == "Noted, [EMAIL]."
    assert report.pii_counts == {"EMAIL": 2, "IBAN": 1, "CARD": 1, "SSN": 1, "UK_NINO": 1, "PHONE": 2}
    assert report.examples_with_pii == 1
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["pii_masked"] == report.pii_counts

    report = curate(path, tmp_path / "out2", CurationConfig(max_tokens=500, scrub_pii=False), tokenizer=tokenizer)
    assert report.pii_counts == {} and PII_TEXT in user_texts(tmp_path / "out2")


def test_pii_detectors():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB83 WEST 1234 5698 7654 32")
    # A 16-digit run that fails Luhn is not a card, in any layout, and is not mistaken for a phone.
    for text in ("4111111111111112", "4111 1111 1111 1112", "4111-1111-1111-1112", "1234 0567 8901 2345"):
        assert scrub(f"ref {text} end") == (f"ref {text} end", {})
    assert scrub("order 12 4111-1111-1111-1111")[0] == "order 12 [CARD]"
    assert scrub("5555555555554444")[0] == "[CARD]"
    # Ordinary numbers stay.
    for text in ("years 2019 2020 2021", "on 2024-01-15", "scores 10 20 30 40 50", "pi is 3.14159", "v1.2.3"):
        assert scrub(text) == (text, {})
    assert scrub("+14155552671.")[0] == "[PHONE]."
    assert scrub("QQ123456C")[0] == "QQ123456C"  # Q is never a NI prefix letter
    assert scrub("a@b.io", kinds=["PHONE"]) == ("a@b.io", {})
    with pytest.raises(ValueError, match="`kinds`"):
        scrub("x", kinds=["PASSPORT"])
    assert set(PII_KINDS) == {"EMAIL", "PHONE", "CARD", "SSN", "UK_NINO", "IBAN"}


# ------------------------------------------------------------------------------------------ contamination


def test_contamination_against_test_texts(tmp_path, tokenizer):
    tests = [
        "Which river flows through the city of Paris and into the English Channel?",
        "What is the boiling point of water?",
    ]
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            chat("Quick one: which river flows through the city of Paris and into the sea?", "The Seine."),  # 8-gram
            chat("what is the BOILING point of water", "100 C at sea level."),  # exact after normalising
            chat("The city of Paris is lovely in spring.", "It is."),  # shares < 8 words: kept
            chat("What is the capital of France?", "Paris."),  # kept
        ],
    )
    report = curate(path, tmp_path / "out", CurationConfig(), tokenizer=tokenizer, test_texts=tests)
    rejected = {r.line: r.message for r in by_rule(report, "contamination")}
    assert set(rejected) == {1, 2}
    assert "8-gram" in rejected[1] and "test text 0" in rejected[1]
    assert "equals test text 1" in rejected[2]
    assert len(all_rows(tmp_path / "out")) == 2

    # A smaller n catches the shorter overlap too.
    report = curate(
        path, tmp_path / "out2", CurationConfig(contamination_ngram=4), tokenizer=tokenizer, test_texts=tests
    )
    assert {r.line for r in by_rule(report, "contamination")} == {1, 2, 3}


def test_contamination_sees_text_before_pii_scrubbing(tmp_path):
    tests = ["Please reset the account for bob@example.com today"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat("please reset the account for bob@example.com today", "Done.")])
    report = curate(path, tmp_path / "out", CurationConfig(contamination_ngram=20), test_texts=tests)
    assert report.rejected_by_rule["contamination"] == 1


# ------------------------------------------------------------------------------------------ split, report

ANIMALS = ["cats", "dogs", "owls", "foxes", "bees", "eels", "yaks", "emus", "moles", "crabs"]


def many_examples(n: int, offset: int = 0) -> list[dict]:
    return [
        chat(
            f"Tell me fact {i} about {ANIMALS[i % 10]} please",
            f"Fact {i}: {ANIMALS[i % 10]} sleep {i} hours.",
        )
        for i in range(offset, offset + n)
    ]


def split_of(out: Path) -> dict[str, str]:
    result = {}
    for split in ("train", "validation"):
        for row in read_jsonl(out / f"{split}.jsonl"):
            result[row["messages"][0]["content"]] = split
    return result


def test_split_is_deterministic(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", many_examples(40))
    config = CurationConfig(validation_fraction=0.5, seed=7)
    r1 = curate(path, tmp_path / "a", config, tokenizer=tokenizer)
    r2 = curate(path, tmp_path / "b", config, tokenizer=tokenizer)
    assert r1.rejections == [] and 0 < r1.validation_rows < 40
    assert r1.outputs == r2.outputs
    for name in ("train.jsonl", "validation.jsonl", "report.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert dataset_hash(tmp_path / "a") == dataset_hash(tmp_path / "b") == r1.dataset_hash

    # The same example lands in the same split when other examples come and go.
    bigger = write_jsonl(tmp_path / "s2.jsonl", many_examples(20) + many_examples(30, offset=100))
    r3 = curate(bigger, tmp_path / "c", config, tokenizer=tokenizer)
    assert r3.rejections == []
    before, after = split_of(tmp_path / "a"), split_of(tmp_path / "c")
    assert all(after[text] == split for text, split in before.items() if text in after)

    # Another seed gives another split.
    curate(path, tmp_path / "d", CurationConfig(validation_fraction=0.5, seed=8), tokenizer=tokenizer)
    assert split_of(tmp_path / "d") != before

    curate(path, tmp_path / "e", CurationConfig(validation_fraction=0.0), tokenizer=tokenizer)
    assert (tmp_path / "e" / "validation.jsonl").read_text() == ""


def test_report_files(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            chat("What is the capital of France? Mail a@b.com", "Paris."),
            "{oops",
            {"messages": [{"role": "<script>alert(1)</script>", "content": "x"}]},
            chat("What is the capital of France? Mail a@b.com", "Paris."),
        ],
    )
    out = tmp_path / "out"
    report = curate(path, out, CurationConfig(), tokenizer=tokenizer)

    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["summary"] == {
        "rows_in": 4,
        "rejected": 3,
        "kept": 1,
        "train": report.train_rows,
        "validation": report.validation_rows,
        "examples_with_pii": 1,
    }
    assert list(saved["rejected_by_rule"]) == list(RULES)
    assert saved["rejected_by_rule"]["json"] == 1 and saved["rejected_by_rule"]["roles"] == 1
    assert saved["rejected_by_rule"]["exact_duplicate"] == 1
    assert saved["sample_rejections"]["json"] == [
        {
            "rule": "json",
            "message": saved["sample_rejections"]["json"][0]["message"],
            "source": str(path),
            "line": 2,
        }
    ]
    assert [s["name"] for s in saved["steps"]] == [
        "parse",
        "validate",
        "pii_scrub",
        "template",
        "length",
        "exact_dedup",
        "near_dedup",
        "contamination",
        "split",
    ]
    for name in ("train.jsonl", "validation.jsonl"):
        import hashlib

        assert saved["outputs"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()

    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "exact_duplicate" in page and "[EMAIL]" in page and ">1</td>" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert sorted(p.name for p in out.iterdir()) == [
        "report.html",
        "report.json",
        "train.jsonl",
        "validation.jsonl",
    ]


def test_report_page_is_rendered_from_the_template_that_ships(tmp_path):
    import fnmatch
    import tomllib

    from training.curation import report as report_mod

    template = report_mod.TEMPLATE
    assert template.name == "report.html.j2" and template.parent == Path(report_mod.__file__).parent
    assert "<table" in template.read_text() and "<table" not in Path(report_mod.__file__).read_text()
    package_data = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())["tool"]
    patterns = package_data["setuptools"]["package-data"]["training"]
    assert any(fnmatch.fnmatch("curation/report.html.j2", p) for p in patterns)

    path = write_jsonl(tmp_path / "p.jsonl", [chat("Name a dog breed.", "Beagle."), "{bad", "{worse"])
    curate(path, tmp_path / "out", CurationConfig())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Summary</h2>" in page and saved["dataset_hash"] in page
    assert '<tr><td>rows read</td><td class="n">3</td></tr>' in page
    assert '<tr><td>rejected</td><td class="n">2</td></tr>' in page
    assert all(f"<td>{step['name']}</td>" in page for step in saved["steps"])
    assert all(f">{rule}</text>" in page for rule in RULES)  # one bar per rule
    assert page.count("<rect ") == len(RULES) and page.endswith("</html>\n")


def test_samples_are_capped_per_rule(tmp_path):
    path = write_jsonl(tmp_path / "j.jsonl", ["{bad"] * 8)
    report = curate(path, tmp_path / "out", CurationConfig(max_samples_per_rule=5))
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rejected_by_rule"]["json"] == 8
    assert [s["line"] for s in saved["sample_rejections"]["json"]] == [1, 2, 3, 4, 5]
    assert report.train_rows == 0


def test_dataset_hash(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"a": 1}\n')
    h = dataset_hash(f)
    assert len(h) == 64 and h == dataset_hash(str(f))
    f.write_text('{"a": 2}\n')
    assert dataset_hash(f) != h

    d = tmp_path / "dir"
    d.mkdir()
    (d / "train.jsonl").write_text("x\n")
    before = dataset_hash(d)
    (d / "report.json").write_text("{}")  # the report is not data
    (d / ".train.jsonl.tmp-123").write_text("partial")  # nor are temp files
    assert dataset_hash(d) == before
    (d / "validation.jsonl").write_text("y\n")
    assert dataset_hash(d) != before
    with pytest.raises(FileNotFoundError, match="`path`"):
        dataset_hash(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "`max_tokens`"),
        ({"validation_fraction": 1.0}, "`validation_fraction`"),
        ({"validation_fraction": -0.1}, "`validation_fraction`"),
        ({"near_dup_threshold": 0.0}, "`near_dup_threshold`"),
        ({"near_dup_threshold": 1.5}, "`near_dup_threshold`"),
        ({"shingle_size": 0}, "`shingle_size`"),
        ({"num_perm": 8}, "`num_perm`"),
        ({"contamination_ngram": 0}, "`contamination_ngram`"),
        ({"pii_kinds": ("EMAIL", "PASSPORT")}, "`pii_kinds`"),
        ({"input_format": "csv"}, "`input_format`"),
        ({"max_samples_per_rule": -1}, "`max_samples_per_rule`"),
    ],
)
def test_config_validation(kwargs, param):
    with pytest.raises(ValueError, match=param) as exc:
        CurationConfig(**kwargs)
    assert "got" in str(exc.value)


def test_config_fields_have_help():
    import dataclasses

    for f in dataclasses.fields(CurationConfig):
        assert f.metadata.get("help"), f.name


def test_missing_input_is_a_setup_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="`input_paths`"):
        curate([tmp_path / "nope.jsonl"], tmp_path / "out")
    with pytest.raises(ValueError, match="`input_paths`"):
        curate([], tmp_path / "out")


def test_forced_input_format(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [chat("a b", "c"), {"prompt": "d e", "completion": "f"}])
    report = curate(path, tmp_path / "out", CurationConfig(input_format="prompt_completion"))
    assert [r.line for r in by_rule(report, "schema")] == [1]
    assert report.inputs[0]["format"] == "prompt_completion"


def test_contamination_is_entity_aware_in_templated_domains(tmp_path, tokenizer):
    tests = ["What is the unit rate of tariff T417?"]
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            chat("What is the unit rate of tariff T896?", "0.231 EUR/kWh"),  # same template, other tariff: kept
            chat("Hi! What is the unit rate of tariff T417?", "0.231 EUR/kWh"),  # the test question: rejected
        ],
    )
    report = curate(path, tmp_path / "out", CurationConfig(), tokenizer=tokenizer, test_texts=tests)
    assert [r.line for r in by_rule(report, "contamination")] == [2]
    with pytest.raises(ValueError, match="`contamination_overlap`"):
        CurationConfig(contamination_overlap=1.0)
