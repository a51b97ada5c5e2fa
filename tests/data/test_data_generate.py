"""``swarmlm data generate``: shares, dedup, provenance, checked problems, bad input."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from swarmlm.data import TokenShards
from swarmlm.data.content import CONTENT_TYPES, DEFAULT_SHARES, SkipStats, parse_shares, user_source
from swarmlm.data.errors import DataError, InputFormatError
from swarmlm.data.generate import generate_corpus, read_mixture, read_records
from swarmlm.data.multilingual import number_words
from swarmlm.data.problems import (
    PROBLEM_KINDS,
    Problem,
    check_problem,
    generate_problem,
    syllogism_valid_by_models,
)

SMALL_MB = 0.25


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("gen") / "corpus"
    report = generate_corpus(out, size_mb=SMALL_MB, vocab_size=600, seed=3)
    return out, report


def test_generated_corpus_has_every_type_at_its_share_within_one_percent(generated) -> None:
    out, report = generated
    assert report.share_max_abs_err <= 0.01
    mix = read_mixture(out)
    assert mix["shares"] == DEFAULT_SHARES | {}
    for t in CONTENT_TYPES:
        assert report.tokens_by_type[t] > 0, t
    # the manifest agrees with the shards token for token
    records = list(read_records(out))
    train = TokenShards.open(out, "train")
    val = TokenShards.open(out, "val")
    assert sum(r["tokens"] for r in records if r["split"] == "train") == len(train)
    assert sum(r["tokens"] for r in records if r["split"] == "val") == len(val)
    assert {r["type"] for r in records if r["split"] == "val"} == set(CONTENT_TYPES)


def test_every_record_carries_type_difficulty_source_and_licence(generated) -> None:
    out, _ = generated
    train = TokenShards.open(out, "train")
    tok = train.load_tokenizer()
    for r in read_records(out):
        assert r["type"] in CONTENT_TYPES
        assert 0.0 <= r["difficulty"] <= 1.0
        assert r["source"]
        assert r["licence"]
        if r["split"] == "train" and r["id"] % 17 == 0:  # spans point at the record's text
            ids = train.read(r["start"], r["tokens"])
            assert ids[-1] == tok.eos_id
            assert len(tok.decode(ids[:-1].tolist()).encode()) == r["bytes"]


def test_generated_problems_in_the_corpus_all_pass_their_check(generated) -> None:
    out, report = generated
    assert report.problems_checked > 50
    assert report.problems_passed == report.problems_checked
    probs = [Problem.from_dict(p) for r in read_records(out) for p in r.get("problems", [])]
    assert probs
    assert all(check_problem(p) for p in probs)


def test_generation_is_reproducible_from_the_seed(generated, tmp_path: Path) -> None:
    out, _ = generated
    again = tmp_path / "again"
    generate_corpus(again, size_mb=SMALL_MB, vocab_size=600, seed=3)
    for name in ("train_00000.bin", "val_00000.bin", "tokenizer.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("kind", PROBLEM_KINDS)
def test_each_problem_kind_checks_at_every_difficulty(kind: str) -> None:
    rng = random.Random(kind)
    for level in (0.0, 0.25, 0.5, 0.75, 1.0):
        for _ in range(30):
            p = generate_problem(kind, rng, level)
            assert check_problem(p), p


def test_a_wrong_answer_fails_its_check() -> None:
    rng = random.Random(1)
    for kind in PROBLEM_KINDS:
        p = generate_problem(kind, rng, 0.5)
        wrong = {"true": "false", "false": "true", "valid": "invalid", "invalid": "valid"}.get(
            p.answer
        )
        if wrong is None and p.kind == "knights_knaves":
            wrong = p.answer.replace("knight", "X").replace("knave", "knight").replace("X", "knave")
        elif wrong is None and p.kind == "propositional":
            wrong = "tautology" if p.answer != "tautology" else "contingent"
        elif wrong is None:
            wrong = p.answer + "1"
        bad = Problem(p.kind, p.content_type, p.question, p.solution, wrong, p.difficulty, p.data)
        assert not check_problem(bad), (kind, p.answer, wrong)


def test_the_table_of_valid_syllogisms_matches_model_checking() -> None:
    from swarmlm.data.problems import _VALID_FORMS

    for figure in range(1, 5):
        for mood in map("".join, itertools.product("AEIO", repeat=3)):
            assert syllogism_valid_by_models(figure, mood) == ((figure, mood) in _VALID_FORMS)


@pytest.mark.parametrize(
    ("n", "lang", "words"),
    [
        (71, "fr", "soixante et onze"),
        (80, "fr", "quatre-vingts"),
        (200, "fr", "deux cents"),
        (21, "de", "einundzwanzig"),
        (1999, "de", "eintausendneunhundertneunundneunzig"),
        (100, "es", "cien"),
        (135, "es", "ciento treinta y cinco"),
        (342, "en", "three hundred forty-two"),
    ],
)
def test_number_words(n: int, lang: str, words: str) -> None:
    assert number_words(n, lang) == words


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("technical=0.5,poetry=0.5", "unknown content type 'poetry'"),
        ("technical=0.5,code=0.4", "sum to 1"),
        ("technical=1.2,code=-0.2", "must be >= 0"),
        ("technical=half", "non-number"),
    ],
)
def test_bad_shares_are_refused_with_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_shares(spec)


def test_bad_generate_arguments_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown content type 'poems'"):
        generate_corpus(tmp_path / "a", sources={"poems": [tmp_path]})
    with pytest.raises(DataError, match="size_mb"):
        generate_corpus(tmp_path / "b", size_mb=0)
    with pytest.raises(InputFormatError, match="no such file"):
        generate_corpus(
            tmp_path / "c", size_mb=0.01, shares="code=1", sources={"code": [tmp_path / "nope"]}
        )
    assert not (tmp_path / "c").exists()


def test_user_folder_skips_binary_and_non_utf8_files_and_counts_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("Bonjour tout le monde.\n\nUne deuxième phrase.\n")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    skips = SkipStats()
    recs = list(user_source("multilingual", src, 0, skips))
    assert [r.text for r in recs] == ["Bonjour tout le monde.\n\nUne deuxième phrase.\n"]
    assert skips.skipped == {"binary": 1, "non_utf8": 1}


def test_user_source_replaces_builtin_and_keeps_its_licence(tmp_path: Path) -> None:
    src = tmp_path / "ml.jsonl"
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(2000)
    ]
    rows = [
        {
            "text": f"Texto {i}: " + " ".join(rng.choice(words) for _ in range(200)),
            "licence": "CC-BY-4.0",
        }
        for i in range(60)
    ]
    rows.insert(1, dict(rows[0]))  # an exact duplicate, early enough to be drawn
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "mixed"
    report = generate_corpus(
        out,
        size_mb=0.05,
        shares="multilingual=0.5,mathematics=0.5",
        sources={"multilingual": [src]},
        vocab_size=400,
    )
    assert report.exact_duplicates_by_type["multilingual"] == 1
    ml = [r for r in read_records(out) if r["type"] == "multilingual"]
    assert ml
    assert all(r["licence"] == "CC-BY-4.0" for r in ml)
    assert report.share_max_abs_err <= 0.01
    assert read_mixture(out)["sources"]["multilingual"] == [str(src)]


def test_malformed_jsonl_source_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(InputFormatError, match=r"bad\.jsonl:2"):
        list(user_source("code", src, 0, SkipStats()))


def test_a_thin_type_lowers_the_total_so_that_shares_still_hold(tmp_path: Path) -> None:
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "a.txt").write_text("A short user document about nothing much at all.\n" * 20)
    report = generate_corpus(
        tmp_path / "out",
        size_mb=0.2,
        shares="creative=0.5,mathematics=0.5",
        sources={"creative": [src]},
        vocab_size=300,
    )
    assert report.limiting_type == "creative"
    assert report.share_max_abs_err <= 0.05  # one record of ~250 tokens is the granule here
    assert report.text_bytes < 10_000


def test_cli_generate_prints_the_type_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from swarmlm.cli import main

    code = main(
        [
            "data",
            "generate",
            "--out",
            str(tmp_path / "c"),
            "--size-mb",
            "0.05",
            "--vocab-size",
            "300",
            "--shares",
            "mathematics=0.6,philosophy=0.4",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mathematics" in out
    assert "philosophy" in out
    code = main(["data", "generate", "--out", str(tmp_path / "d"), "--shares", "maths=1"])
    assert code == 2
    assert "unknown content type 'maths'" in capsys.readouterr().err


def test_a_type_whose_source_yields_nothing_is_named(tmp_path: Path) -> None:
    from swarmlm.data.errors import EmptyCorpusError

    src = tmp_path / "only-binary"
    src.mkdir()
    (src / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(EmptyCorpusError, match="content type 'code'"):
        generate_corpus(
            tmp_path / "out",
            size_mb=0.02,
            shares="code=0.5,mathematics=0.5",
            sources={"code": [src]},
            vocab_size=300,
        )
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_dataset_dir_without_datasets_installed_says_so(tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed here")
    ds = tmp_path / "hf"
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match="'datasets' package is not installed"):
        list(user_source("creative", ds, 0, SkipStats()))
