"""Malformed corpus files: each ends in a CorpusError that names the file, the place and a fix, or loads as
exactly the prompts the rules in amortized3d/data/corpora.py's module docstring ("Validation") give. The
expected values below come from those rules (and from the JSON and CSV specifications, RFC 8259 and
RFC 4180), not from running the loader."""

from __future__ import annotations

import os
import sys
import unicodedata
from pathlib import Path

import pytest

from amortized3d.data import corpora
from amortized3d.data.corpora import MAX_PROMPT_CHARACTERS, CorpusError, load_file
from tests.fuzz_inputs import malformed_corpus_files

LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # every character str.splitlines() splits at (Python docs)


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def error(spec: str, *words: str, shown: str | None = None) -> str:
    """The message of the CorpusError that loading ``spec`` raises (any other exception fails the test); it is one
    printable line that names the file (``shown``, else the spec) and contains each of ``words``."""
    with pytest.raises(CorpusError) as caught:
        load_file(spec)
    message = str(caught.value)
    assert type(caught.value) is CorpusError
    assert (shown or spec) in message, message
    assert message.isprintable(), message  # one paragraph: no newline, no control character, encodable
    for word in words:
        assert word in message, (word, message)
    return message


def prompts(spec: str) -> list[str]:
    corpus = load_file(spec)
    return corpus.train


# ----------------------------------------------------------------------------- JSON structure


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    '{"train": ' + "[" * 100_000,
    '{"train": [' + "[" * 100_000 + "]" * 100_000 + "]}",
    '{"train": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
])
def test_json_nested_100000_levels(tmp_path, text):
    """Rule: nesting deeper than the parser can follow is an error (not a RecursionError)."""
    error(write(tmp_path / "deep.json", text), "nested too deeply", "rewrite it as an object of flat lists of strings")


def test_json_nested_lists_and_objects_are_not_prompts(tmp_path):
    """Rule: lists and objects are not prompts; the error gives the line, split and index of the item."""
    path = write(tmp_path / "n.json", '{"train": [\n "a frog",\n [[["a dog"]]]\n],\n "val": [{"prompt": "a cat"}]}')
    error(path, "line 3, train[1]: a list of 1 item is not a prompt", "prompts must be strings")
    path = write(tmp_path / "o.json", '{"train": ["a frog"],\n "val": [{"prompt": "a cat"}]}')
    error(path, "line 2, val[0]: an object is not a prompt")


@pytest.mark.parametrize("raw, shown", [
    ("1" + "0" * 5000, "the number 100000000000... (5,001 characters)"),  # over Python's 4,300-digit int limit
    ("-" + "9" * 20000, "the number -99999999999... (20,001 characters)"),
    ("1" + "0" * 400 + ".5", "the number 100000000000... (403 characters)"),
    ("1e999", "the number 1e999"), ("1.5", "the number 1.5"), ("0", "the number 0"),
    ("NaN", "the number NaN"), ("Infinity", "the number Infinity"), ("-Infinity", "the number -Infinity"),
    ("true", "true"), ("false", "false"), ("null", "null"),
])
def test_json_numbers_and_literals_are_not_prompts(tmp_path, raw, shown):
    """Rule: numbers of any size (never converted), NaN, Infinity, true, false and null are not prompts."""
    path = write(tmp_path / "num.json", '{"train": [\n  "a frog",\n  ' + raw + "\n]}")
    error(path, f"line 3, train[1]: {shown} is not a prompt", "prompts must be strings")


@pytest.mark.parametrize("text, what", [
    ('["a frog", "a dog"]', "the top level is a list of 2 items, not an object"),
    ('"a frog"', "the top level is the string 'a frog', not an object"),
    ("1" + "0" * 5000, "the top level is the number 100000000000... (5,001 characters), not an object"),
    ("null", "the top level is null, not an object"),
])
def test_json_top_level_must_be_an_object(tmp_path, text, what):
    """Rule: the top level is an object; the hint says where a plain list of prompts goes."""
    error(write(tmp_path / "top.json", text), f"line 1: {what}", 'a list of prompts goes in "train"')


@pytest.mark.parametrize("text, line, what", [
    ('{"train": {"a": "b"}}', 1, "'train' is an object, not a list"),
    ('{"train": "a red cube"}', 1, "'train' is the string 'a red cube', not a list"),
    ('{"train": ["a frog"],\n "val": null}', 2, "'val' is null, not a list"),
    ('{"train": ["a frog"],\n\n "test": 3}', 3, "'test' is the number 3, not a list"),
])
def test_json_split_must_be_a_list(tmp_path, text, line, what):
    """Rule: train, val and test are lists of prompt strings."""
    error(write(tmp_path / "s.json", text), f"line {line}: {what}", "write it as a list of prompt strings")


def test_json_duplicate_key_is_an_error(tmp_path):
    """Rule: a key written twice is an error (json.loads would keep the last list silently)."""
    path = write(tmp_path / "dup.json", '{\n "train": ["a frog"],\n "val": ["a dog"],\n "train": ["a cat"]\n}')
    error(path, "line 4: the key 'train' appears more than once", "merge its lists into one or remove the extra one")
    path = write(tmp_path / "dup2.json", '{"train": ["a frog"], "test": [], "test": ["a cat"]}')
    error(path, "line 1: the key 'test' appears more than once")


def test_json_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    """Rule: no key but train, val and test; a misspelt one is reported with the closest split name."""
    path = write(tmp_path / "typo.json", '{"train": ["a frog"],\n "tset": ["a dog"]}')
    error(path, "line 2: unknown key 'tset'", "did you mean 'test'?", "rename or remove the key")
    message = error(write(tmp_path / "meta.json", '{"train": ["a frog"], "source": "me"}'), "unknown key 'source'")
    assert "did you mean" not in message
    error(write(tmp_path / "no.json", '{"val": ["a frog"]}'), "has no 'train' list", "add one")
    error(write(tmp_path / "e.json", '{"train": [], "val": ["a frog"]}'), "the 'train' list is empty")


def test_json_syntax_errors_name_line_and_column(tmp_path):
    """JSON (RFC 8259) forbids raw control characters in strings and trailing commas."""
    error(write(tmp_path / "c.json", '{"train": [\n "a\tfrog"]}'), "line 2, column 4: not valid JSON", "fix the syntax there")
    error(write(tmp_path / "t.json", '{"train": ["a frog"]\n'), "line 2, column 1: not valid JSON")


# ----------------------------------------------------------------------------- characters


@pytest.mark.parametrize("escape, code", [("\\ud800", "U+D800"), ("\\udfff", "U+DFFF"), ("\\udbff x", "U+DBFF")])
def test_json_lone_surrogate_is_refused(tmp_path, escape, code):
    """Rule: surrogates (Cs) are refused: a lone one cannot be encoded as UTF-8 (the tokenizer would crash)."""
    path = write(tmp_path / "sur.json", '{"train": [\n "a frog",\n "a ' + escape + ' cube"]}')
    error(path, "line 3, train[1]", code, "lone surrogate, which cannot be encoded as UTF-8", "remove it")


def test_json_surrogate_pair_is_one_character(tmp_path):
    """RFC 8259 section 7: an escaped surrogate pair is one character (here U+1F600)."""
    assert prompts(write(tmp_path / "pair.json", '{"train": ["a \\ud83d\\ude00 ball"]}')) == ["a \U0001f600 ball"]


@pytest.mark.parametrize("char, accepted", [
    ("\ufffe", False), ("\uffff", False), ("\ufdd0", False), ("\U0010ffff", False), ("\U0001fffe", False),  # noncharacters
    ("\ufeff", False),  # a byte-order mark inside the text
    ("\u2028", False), ("\u2029", False), ("\x85", False), ("\x00", False), ("\x7f", False), ("\x9f", False),
    ("\ue000", True), ("\U000f0000", True),  # private use: accepted
    ("\u200d", True), ("\u00ad", True), ("\u200e", True),  # format characters (Cf): accepted
    ("\u00a0", True), ("\u3000", True),  # spaces (Zs) inside a prompt: accepted
])
def test_refused_and_accepted_characters(tmp_path, char, accepted):
    """Rule: Cc, Cs, U+2028/U+2029, noncharacters and U+FEFF are refused; private use, Cf and Zs are accepted."""
    inside = f"\\u{ord(char):04x}" if ord(char) < 0x10000 else char  # a JSON escape, or the character itself
    path = write(tmp_path / "ch.json", '{"train": ["a red ' + inside + ' cube"]}')
    if accepted:
        assert prompts(path) == [f"a red {char} cube"]
    else:
        error(path, "line 1, train[0]", f"holds U+{ord(char):04X}", "at character 7", "remove it")


def test_refused_characters_are_exactly_the_documented_ones():
    """The refused set is Cc + Cs + U+2028, U+2029, U+FEFF + noncharacters; what strip() removes is tab + Zs."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    refused = {m.start() for m in corpora._REFUSED.finditer(every)}
    documented = {cp for cp in range(sys.maxunicode + 1) if unicodedata.category(every[cp]) in ("Cc", "Cs")}
    documented |= {0x2028, 0x2029, 0xFEFF} | set(range(0xFDD0, 0xFDF0))
    documented |= {plane << 16 | last for plane in range(17) for last in (0xFFFE, 0xFFFF)}
    assert refused == documented
    zs = {c for c in every if unicodedata.category(c) == "Zs"}
    assert set(corpora._BLANKS) == zs | {"\t"} and len(corpora._BLANKS) == len(zs) + 1
    assert set(LINE_BREAKS) <= {every[cp] for cp in refused}  # so no accepted prompt spans two lines


def test_prompt_length_limit(tmp_path):
    """Rule: at most MAX_PROMPT_CHARACTERS (10,000) characters after stripping spaces and tabs, in every format."""
    longest, over = "x" * MAX_PROMPT_CHARACTERS, "x" * (MAX_PROMPT_CHARACTERS + 1)
    assert prompts(write(tmp_path / "ok.txt", f"  {longest}\t\n")) == [longest]
    assert prompts(write(tmp_path / "ok.json", f'{{"train": ["{longest}"]}}')) == [longest]
    assert prompts(write(tmp_path / "ok.csv", f"prompt\n{longest}\n")) == [longest]
    limit = "10,001 characters long, over the limit of 10,000 characters for a prompt"
    error(write(tmp_path / "a.txt", f"a frog\n{over}\n"), "line 2:", limit, "shorten it")
    error(write(tmp_path / "a.json", f'{{"train": ["a frog",\n "{over}"]}}'), "line 2, train[1]:", limit)
    error(write(tmp_path / "a.csv", f"uid,prompt\n1,a frog\n2,{over}\n"), "line 3, column 'prompt':", limit)
    error(write(tmp_path / "huge.txt", "z" * 1_000_000), "line 1:", "1,000,000 characters long")


def test_csv_field_over_the_csv_module_limit(tmp_path):
    """A field longer than csv.field_size_limit() (131,072) is an error naming the line where its record starts."""
    error(write(tmp_path / "f.csv", "prompt\na frog\n" + "x" * 140_000 + "\n"), "line 3: not valid CSV",
          "longer than the csv module's limit of 131,072 characters", "at most 10,000", "shorten it")
    error(write(tmp_path / "q.csv", 'prompt\na frog\n"a dog\n' + "a cat\n" * 30_000),  # an unclosed quote
          "line 3: not valid CSV", "close the quote")


# ----------------------------------------------------------------------------- text files


@pytest.mark.parametrize("sep", ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029", "\r", "\x00", "\t"])
def test_text_line_separators_other_than_newline_are_errors(tmp_path, sep):
    """Rule: a line ends at \\n or \\r\\n only, so 'a red cube<sep>big' is line 2 and <sep> is a refused character
    at character 11 (the column an editor shows); str.splitlines() would have made two prompts of it."""
    path = write(tmp_path / "p.txt", f"a frog\na red cube{sep}big\na chair\n")
    error(path, "line 2:", f"holds U+{ord(sep):04X}", "at character 11", "(prompts may not hold control characters")


def test_text_line_ends(tmp_path):
    """Rule: \\n and \\r\\n end lines (mixed too); surrounding spaces, tabs and Zs are stripped; trailing blank lines
    are ignored; a lone \\r, even at the end of the file, is a refused control character."""
    assert prompts(write(tmp_path / "a.txt", "a frog\r\na chair\nan owl")) == ["a frog", "a chair", "an owl"]
    assert prompts(write(tmp_path / "b.txt", "\ta frog \t\r\n\u3000a chair\u00a0\r\n\r\n \t\n")) == ["a frog", "a chair"]
    error(write(tmp_path / "c.txt", "a frog\r"), "line 1:", "U+000D CARRIAGE RETURN", "lines end only at \\n or \\r\\n")
    error(write(tmp_path / "d.txt", "a frog\ra chair\ran owl\r"), "line 1:", "U+000D", "at character 7")
    error(write(tmp_path / "e.txt", "a frog\na\tchair\n"), "line 2:", "U+0009 TAB", "at character 2")


def test_text_blank_and_empty_files(tmp_path):
    """Rule: blank lines at the end are ignored, elsewhere they are errors; a file with no prompt is an error."""
    error(write(tmp_path / "a.txt", "\na frog\n"), "line 1:", "empty or only whitespace", "remove it")
    for i, content in enumerate([b"", b"\n\n", b" \t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"]):
        error(write(tmp_path / f"e{i}.txt", content), "the file is empty", "write one prompt per line")


# ----------------------------------------------------------------------------- byte-order marks


def test_one_leading_bom_is_dropped_in_every_format(tmp_path):
    """Rule: one U+FEFF at the start of the file is dropped (it would otherwise rename the first CSV column,
    start the first text prompt, or make the JSON unreadable)."""
    bom = b"\xef\xbb\xbf"
    assert prompts(write(tmp_path / "a.txt", bom + b"a frog\na chair\n")) == ["a frog", "a chair"]
    assert prompts(write(tmp_path / "a.csv", bom + b"prompt,uid\na frog,1\n")) == ["a frog"]
    assert prompts(write(tmp_path / "b.csv", bom + b"uid,prompt\n1,a frog\n")) == ["a frog"]
    assert prompts(write(tmp_path / "a.json", bom + b'{"train": ["a frog"]}')) == ["a frog"]


def test_a_second_bom_is_an_error(tmp_path):
    """Rule: U+FEFF inside the text is refused (e.g. where two files with BOMs were joined)."""
    bom = "\ufeff"
    error(write(tmp_path / "a.txt", f"{bom}{bom}a frog\n"), "line 1:", "U+FEFF", "byte-order mark", "at character 1")
    error(write(tmp_path / "b.txt", f"{bom}a frog\n{bom}a chair\n"), "line 2:", "U+FEFF")
    error(write(tmp_path / "c.csv", f"{bom}prompt\n{bom}a frog\n"), "line 2, column 'prompt'", "U+FEFF")
    error(write(tmp_path / "d.json", f'{bom}{bom}{{"train": ["a frog"]}}'), "line 1, column 1: not valid JSON")


# ----------------------------------------------------------------------------- CSV


def test_csv_duplicate_prompt_column_is_an_error(tmp_path):
    """Rule: the header must name the prompt column exactly once; other columns may repeat."""
    path = write(tmp_path / "d.csv", "prompt,uid,prompt\na frog,1,a dog\n")
    error(path, "line 1: the header names the column 'prompt' 2 times (fields 1, 3)", "rename or remove all but one")
    error(path + "#prompt", "the column 'prompt' 2 times", shown=path)
    assert prompts(write(tmp_path / "ok.csv", "uid,uid,prompt\n1,2,a frog\n")) == ["a frog"]


@pytest.mark.parametrize("text, words", [
    ("uid,prompt\n1,a frog\n2\n", ["line 3 has 1 field(s) but the header has 2", "give every line the header's fields"]),
    ("prompt\na red apple, sliced\n", ["line 2 has 2 field(s) but the header has 1", "quote a prompt that holds a comma"]),
    ("prompt\na frog\n\na dog\n", ["line 3 is blank", "remove it"]),
    ("\nprompt\na frog\n", ["line 1 is blank", "the first line of a CSV corpus is its header"]),
    ("prompt\n", ["no prompt lines under the header", "write one prompt per line"]),
    ("", ["the file is empty", "write a header line naming the prompt column"]),
    ("a red cube\na blue ball\n", ["line 1: the header has no column 'prompt', 'caption' or 'text' (columns: 'a red cube')",
                                   "add a header line 'prompt'"]),
    ('prompt\na frog\n"a dog\na cat\n', ["line 3: not valid CSV: a quoted field is not closed", "close its quote"]),
    ('prompt\n"a frog" big\n', ["line 2: not valid CSV: text follows the closing quote", 'write a quote inside it as ""']),
    ("prompt\na frog\ra dog\n", ["line 2: not valid CSV: a carriage return (U+000D)", "lines end only at \\n or \\r\\n"]),
    ('prompt\n"a frog\ra dog"\n', ["line 2, column 'prompt'", "U+000D"]),
    ('uid,prompt\n1,"a red\ncube"\n2,a dog\n', ["line 2, column 'prompt'", "U+000A LINE FEED", "at character 6"]),
])
def test_csv_malformed(tmp_path, text, words):
    """RFC 4180 (strict): one header line, the same number of fields on every line, quotes closed and doubled inside."""
    error(write(tmp_path / "m.csv", text), *words)


def test_csv_line_ends_and_quoting(tmp_path):
    """RFC 4180 and the rules: \\r\\n ends lines, quoted commas and doubled quotes are part of the prompt, blank lines
    at the end are ignored."""
    path = write(tmp_path / "ok.csv", 'uid,prompt\r\n1,"a red apple, sliced"\r\n2,"a 12"" pizza"\r\n3,a 12" pizza\r\n\r\n\n')
    assert prompts(path) == ["a red apple, sliced", 'a 12" pizza']  # the third is a duplicate of the second
    assert load_file(path).raw_sizes["train"] == 3


def test_csv_column_spec(tmp_path):
    """'.csv#COLUMN' names the column (a close match is suggested); '#' needs a name; '#' in a folder name is kept."""
    path = write(tmp_path / "c.csv", "uid,prompt\n1,a frog\n")
    error(path + "#promt", "line 1: no column 'promt' (columns: 'uid', 'prompt')", "did you mean 'prompt'?", shown=path)
    error(path + "#", "no column name after '#'", f"{path}#COLUMN")
    folder = tmp_path / "v1.csv#old"
    folder.mkdir()
    nested = write(folder / "p.csv", "uid,prompt\n1,a frog\n")
    assert prompts(nested) == ["a frog"] and prompts(nested + "#uid") == ["1"]


# ----------------------------------------------------------------------------- paths and reading


def test_paths_that_are_not_readable_files(tmp_path, monkeypatch):
    """Rule: every failure to reach or read the file is a CorpusError naming it."""
    error(str(tmp_path / "missing.json"), "the corpus file does not exist", "check the path")
    (tmp_path / "folder.json").mkdir()
    error(str(tmp_path / "folder.json"), "is a folder, not a file", "give the path of a .json, .txt or .csv")
    os.mkfifo(tmp_path / "pipe.txt")
    error(str(tmp_path / "pipe.txt"), "is not a regular file")
    nul = str(tmp_path / "a\0b.json")
    error(nul, "holds a NUL character (U+0000)", "check how the path was written", shown=str(tmp_path / "a\\x00b.json"))
    newline = write(tmp_path / "a\nb.txt", "a fr\x07og\n")
    error(newline, "line 1:", "U+0007", shown=str(tmp_path / "a\\nb.txt"))
    error(write(tmp_path / "p.yaml", "train: [a]"), "unknown corpus format '.yaml'")
    path = write(tmp_path / "locked.txt", "a frog\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root
    error(path, "the file cannot be read (Permission denied)", "permissions")


def test_not_utf8(tmp_path):
    """Rule: files are UTF-8; a UTF-16 file is recognised by its byte-order mark in the hint."""
    error(write(tmp_path / "l.txt", "a frog\na café\n".encode("latin-1")), "line 2: not valid UTF-8", "save the file as UTF-8")
    error(write(tmp_path / "u.json", '{"train": ["a frog"]}'.encode("utf-16")), "line 1: not valid UTF-8",
          "UTF-16 byte-order mark")


# ----------------------------------------------------------------------------- fuzzing


def valid_prompt(prompt) -> bool:
    """What every loaded prompt must be, stated independently of the loader's code."""
    return (isinstance(prompt, str) and prompt != "" and prompt == prompt.strip() and len(prompt) <= MAX_PROMPT_CHARACTERS
            and all(unicodedata.category(c) not in ("Cc", "Cs") and c not in LINE_BREAKS for c in prompt)
            and len(prompt.encode("utf-8")) >= len(prompt))


def test_fuzzed_files_load_or_raise_corpus_error(tmp_path):
    """200 seeded malformed files: each loads as valid prompts or raises a one-line CorpusError naming the file."""
    outcomes = {"loaded": 0, "refused": 0}
    for name, data in malformed_corpus_files(seed=1234, n=200):
        path = tmp_path / name
        path.write_bytes(data)
        try:
            corpus = load_file(str(path))
        except CorpusError as err:
            message = str(err)
            assert str(path) in message and message.isprintable(), (name, message)
            outcomes["refused"] += 1
        except Exception as err:  # noqa: BLE001 - any other exception is the failure this test looks for
            pytest.fail(f"{name}: {type(err).__name__}: {str(err)[:300]}")
        else:
            loaded = corpus.train + corpus.val + corpus.test
            assert loaded and all(valid_prompt(p) for p in loaded), (name, [p[:80] for p in loaded if not valid_prompt(p)])
            outcomes["loaded"] += 1
    assert outcomes["loaded"] >= 10 and outcomes["refused"] >= 100, outcomes


def test_fuzz_generator_is_seeded():
    assert malformed_corpus_files(7, 20) == malformed_corpus_files(7, 20)
    assert malformed_corpus_files(7, 20) != malformed_corpus_files(8, 20)
