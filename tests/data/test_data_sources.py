"""Reading raw inputs: formats, compression, bad bytes, malformed records, segmentation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from swarmlm.data import InputFormatError
from swarmlm.data.sources import ReadStats, discover_inputs, iter_units


def read_docs(paths: list[Path], **kw: object) -> tuple[list[str], ReadStats]:
    """Documents (units joined up to doc_end) of the given inputs."""
    stats = ReadStats()
    docs, current = [], []
    for unit in iter_units(discover_inputs(paths), stats, **kw):  # type: ignore[arg-type]
        current.append(unit.text)
        if unit.doc_end:
            docs.append("".join(current))
            current = []
    assert not current
    return docs, stats


def test_gzip_zstd_and_plain_text_read_identically(tmp_path: Path) -> None:
    text = "In the beginning.\n\nSecond paragraph, ünïcödé ✓\nlast line without newline"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "c.md.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    for name in ("a.txt", "b.txt.gz", "c.md.zst"):
        docs, stats = read_docs([tmp_path / name])
        assert docs == [text], name
        assert stats.replaced_bytes == 0


def test_jsonl_records_are_documents_and_compression_works(tmp_path: Path) -> None:
    records = [{"text": "first doc\nwith two lines"}, {"text": "second", "id": 7}, {"text": "  "}]
    body = "\n".join(json.dumps(r) for r in records) + "\n\n"
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    docs, stats = read_docs([tmp_path / "d.jsonl.gz"])
    assert docs == ["first doc\nwith two lines", "second"]
    assert stats.documents == 2
    assert stats.empty_documents == 1


def test_non_utf8_bytes_are_replaced_and_counted_per_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 ok \xff\xfe end\n")
    good = tmp_path / "good.txt"
    good.write_text("fine\n", encoding="utf-8")
    docs, stats = read_docs([bad, good])
    assert docs[0] == "caf\ufffd ok \ufffd\ufffd end\n"
    assert stats.replaced_bytes == 3
    assert stats.replaced_by_file == {str(bad): 3}


def test_utf8_sequence_split_across_read_blocks_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import swarmlm.data.sources as sources

    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 3)
    (tmp_path / "u.txt").write_text("ééé ✓✓\n", encoding="utf-8")
    docs, stats = read_docs([tmp_path / "u.txt"])
    assert docs == ["ééé ✓✓\n"]
    assert stats.replaced_bytes == 0


def test_malformed_jsonl_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(InputFormatError, match=r"broken\.jsonl:2: invalid JSON"):
        read_docs([p])
    q = tmp_path / "notext.jsonl"
    q.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(InputFormatError, match=r"notext\.jsonl:1: .*'text'"):
        read_docs([q])


def test_corrupt_gzip_error_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "x.txt.gz"
    p.write_bytes(gzip.compress(b"hello world\n" * 100)[:-20])
    with pytest.raises(InputFormatError, match=r"x\.txt\.gz"):
        read_docs([p])


def test_missing_and_unsupported_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match=r"nope\.txt: no such file"):
        discover_inputs([tmp_path / "nope.txt"])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(InputFormatError, match=r"table\.csv: unsupported file type"):
        discover_inputs([tmp_path / "table.csv"])


def test_directories_are_walked_recursively_skipping_other_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub" / "a.md").write_text("a")
    (tmp_path / "sub" / "deeper" / "c.jsonl.zst").write_bytes(b"")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("h")
    found = [f.path.relative_to(tmp_path).as_posix() for f in discover_inputs([tmp_path])]
    assert found == ["b.txt", "sub/a.md", "sub/deeper/c.jsonl.zst"]


def test_long_documents_are_cut_into_bounded_units_preferring_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"paragraph {i} " + "word " * 30 + "\n\n" for i in range(20)]
    text = "".join(paragraphs) + "x" * 500  # ends with one enormous line
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    stats = ReadStats()
    units = list(iter_units(discover_inputs([tmp_path / "long.txt"]), stats, max_unit_chars=200))
    assert "".join(u.text for u in units) == text
    assert all(len(u.text) <= 200 for u in units)
    assert [u.doc_end for u in units] == [False] * (len(units) - 1) + [True]
    # Cuts fall after blank lines whenever a paragraph boundary is available.
    assert all(u.text.endswith("\n\n") for u in units[:19])
    assert stats.documents == 1


def test_sft_lines_split_at_first_bar_and_bad_lines_are_named(tmp_path: Path) -> None:
    p = tmp_path / "sft.txt"
    p.write_text("I like to cook in the |kitchen\n\nQ: a|b? |A: yes|no\n", encoding="utf-8")
    stats = ReadStats()
    units = list(iter_units(discover_inputs([p]), stats, fmt="sft"))
    assert [(u.prompt, u.text) for u in units] == [
        ("I like to cook in the ", "kitchen"),
        ("Q: a", "b? |A: yes|no"),
    ]
    bad = tmp_path / "bad.txt"
    bad.write_text("fine|yes\nno separator here\n", encoding="utf-8")
    with pytest.raises(InputFormatError, match=r"bad\.txt:2: SFT line has no '\|'"):
        list(iter_units(discover_inputs([bad]), ReadStats(), fmt="sft"))


def test_sft_jsonl_records_need_prompt_and_target_strings(tmp_path: Path) -> None:
    p = tmp_path / "sft.jsonl.zst"
    body = '{"prompt": "2+2=", "target": "4"}\n{"prompt": "", "target": "x|y"}\n'
    p.write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    units = list(iter_units(discover_inputs([p]), ReadStats(), fmt="sft"))
    assert [(u.prompt, u.text) for u in units] == [("2+2=", "4"), ("", "x|y")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": 3}\n')
    with pytest.raises(InputFormatError, match=r"bad\.jsonl:1: SFT record needs"):
        list(iter_units(discover_inputs([bad]), ReadStats(), fmt="sft"))
