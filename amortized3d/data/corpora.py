"""Named prompt corpora: the catalog in corpora/catalog.yaml, user files, splits, and validation.

    load_corpus("shapeworld-16")            generated, nothing to download
    load_corpus("mg15")                     a JSON file in the corpus folder
    load_corpus("/path/to/prompts.json")    {"train": [...], "val": [...], "test": [...]}
    load_corpus("/path/to/prompts.txt")     one prompt per line (all train)
    load_corpus("/path/to/prompts.csv")     the column "prompt" (else "caption", else "text"), all train;
    load_corpus("/path/to/prompts.csv#col") or the column named after '#'
    load_corpus("prompt:a hamburger")       one prompt, in every split: a per-prompt run (`train --prompt`)

The corpus folder for file corpora is, in order: the ``corpus_dir`` argument
(``--corpus-dir``, ``corpus.dir``), the AMORTIZED3D_CORPORA environment variable,
or ~/.cache/amortized3d/corpora.

Validation: a corpus file either loads as the prompts it holds or raises CorpusError (a
ValueError) whose one-line message names the file, the place (line; JSON split and index; CSV
column; the character's position in the prompt), what is wrong and how to fix it; it never
loads as a different list of prompts.
  * Files are UTF-8; one byte-order mark (U+FEFF) at the start of the file is dropped (all formats).
  * A prompt is a string. Surrounding spaces (Unicode category Zs) and tabs are stripped; the rest
    must be non-empty, at most MAX_PROMPT_CHARACTERS (10,000) characters long, and hold none of
    these refused characters, which an error names by code point (U+000B): control characters
    (category Cc, U+0000-U+001F and U+007F-U+009F: a tab inside a prompt, \\n, \\r, \\v, \\f,
    U+001C-U+001F, NEL U+0085), the line and paragraph separators U+2028 and U+2029, surrogates
    (category Cs, U+D800-U+DFFF: only a JSON escape such as "\\ud800" makes one, and UTF-8 cannot
    encode it), noncharacters (U+FDD0-U+FDEF and the last two code points of every plane, U+FFFE,
    U+FFFF, U+1FFFE, ...) and byte-order marks inside the text (U+FEFF). Other format characters
    (category Cf: zero-width joiners in emoji, soft hyphens, bidirectional marks) and private-use
    characters are accepted. So no prompt spans two lines, whatever a program counts as a line end.
  * JSON: the top level is an object with a "train" list and optional "val" and "test" lists of
    prompt strings, and no other key (the error suggests the closest split name for a misspelt
    one); a top-level key written twice is an error. Numbers (kept as text, never converted,
    whatever their size), NaN, Infinity, true, false, null, lists and objects are not prompts;
    nesting deeper than the parser can follow is an error.
  * Text: a line ends at \\n or \\r\\n and nowhere else, so an error's line number is the one an
    editor shows; a lone \\r is refused like any control character. Each line is one prompt;
    blank lines at the end of the file are ignored, a blank line before the last prompt is an error.
  * CSV (RFC 4180, read by Python's csv module in strict mode from lines split at \\n): the first
    line is the header, which must name the prompt column exactly once ("prompt", else "caption",
    else "text", or the column after '#'; other columns may repeat); every other line has as many
    fields as the header (a prompt holding a comma is quoted, a quote inside it doubled); blank
    lines at the end are ignored, elsewhere they are an error.
Duplicates policy: within a split, a prompt that appears again is dropped after its first
occurrence (so sampling is uniform over distinct prompts); ``Corpus.duplicates`` records what
was dropped, and ``amortized3d corpus info`` reports it (DL17k's train split holds one prompt
201 times).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from amortized3d.shapeworld import shapeworld_corpus

CATALOG_PATH = Path(__file__).resolve().parents[2] / "corpora" / "catalog.yaml"
SPLITS = ("train", "val", "test")
MAX_PROMPT_CHARACTERS = 10_000  # 20x the longest reference prompt (523); text encoders read 77 tokens, a few hundred characters
BOM = "\ufeff"
_BLANKS = "\t \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"  # tab and category Zs
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff" + _NONCHARACTERS + "]")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BELL", 0x08: "BACKSPACE", 0x09: "TAB", 0x0A: "LINE FEED", 0x0B: "VERTICAL TAB",
                  0x0C: "FORM FEED", 0x0D: "CARRIAGE RETURN", 0x1B: "ESCAPE", 0x1C: "FILE SEPARATOR", 0x1D: "GROUP SEPARATOR",
                  0x1E: "RECORD SEPARATOR", 0x1F: "UNIT SEPARATOR", 0x7F: "DELETE", 0x85: "NEXT LINE"}
_JSON_EXAMPLE = '{"train": ["a red cube", ...], "val": [...], "test": [...]}'


class CorpusError(ValueError):
    """An unknown corpus name, a missing file or malformed prompts."""


@dataclass
class Corpus:
    """Distinct prompts per split; duplicates[split] = {prompt: extra occurrences dropped}."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]
    duplicates: dict[str, dict[str, int]] = field(default_factory=dict)
    raw_sizes: dict[str, int] = field(default_factory=dict)

    def all_prompts(self) -> list[str]:
        """Every prompt of every split, each once, in the order train, val, test."""
        return list(dict.fromkeys(self.train + self.val + self.test))

    def split(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise CorpusError(f"split {name!r} is not one of {', '.join(SPLITS)}")
        return getattr(self, name)


def catalog() -> dict:
    with open(CATALOG_PATH) as f:
        return yaml.safe_load(f)


def corpus_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("AMORTIZED3D_CORPORA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "amortized3d" / "corpora"


PROMPT_PREFIX = "prompt:"
PROMPT_RECIPE = "prompt-shapeworld"  # the recipe of a per-prompt run without --config (CPU, analytic prior)


def single_prompt(name: str) -> str | None:
    """The prompt of a per-prompt corpus name ("prompt:TEXT" -> TEXT, checked like any prompt), or None for any
    other corpus name."""
    if not name.startswith(PROMPT_PREFIX):
        return None
    return check_prompt(name[len(PROMPT_PREFIX):], f"corpus {_excerpt(name)}")


def recipe_for_corpus(name: str) -> str:
    entries = catalog()
    if single_prompt(name) is not None:
        return PROMPT_RECIPE
    if name not in entries:
        if is_file_spec(name):
            return "shapeworld"  # ShapeWorld prompts train as they are; others need --config or --prior (train() checks)
        raise CorpusError(f"unknown corpus {name!r}; use one of the known corpora ({', '.join(entries)}) or pass the path of a "
                          ".json, .txt or .csv file, or write prompt:TEXT for one prompt (`amortized3d corpus list` shows them)")
    recipe = entries[name].get("recipe")
    if recipe is None:
        trainable = [n for n, e in entries.items() if e.get("recipe")]
        raise CorpusError(
            f"corpus {name!r} has no training recipe yet (its reference recipe uses a generator this version does not "
            f"have). Corpora with a recipe: {', '.join(trainable)}. To train it anyway, give a recipe explicitly, e.g. "
            f"--corpus {name} --config configs/mg15.yaml (Hyper-iNGP with Stable Diffusion)."
        )
    return recipe


# ----------------------------------------------------------------------------- messages


def _printable(text: str) -> str:
    """``text`` with each unprintable character (newline, control, surrogate, ...) written as its escape,
    so that a message holding a path stays one printable line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _excerpt(text: str, at: int = 0, width: int = 60) -> str:
    """repr() of at most ``width`` characters of ``text`` around index ``at``, with '...' where it is cut."""
    start = max(0, min(at - width // 2, len(text) - width))
    return ("..." if start else "") + repr(text[start : start + width]) + ("..." if start + width < len(text) else "")


def _character(c: str) -> str:
    """A refused character for a message: 'U+000B VERTICAL TAB (a control character)'."""
    name = _CONTROL_NAMES.get(ord(c)) or unicodedata.name(c, "")
    category = unicodedata.category(c)
    if category == "Cc":
        kind = "a control character"
    elif category == "Cs":
        kind = "a lone surrogate, which cannot be encoded as UTF-8"
    elif c in "\u2028\u2029":
        kind = "a line or paragraph separator"
    elif c == BOM:
        kind = "a byte-order mark inside the text, e.g. from joining files"
    else:
        kind = "a noncharacter, never valid in text"
    return f"U+{ord(c):04X}{' ' + name if name else ''} ({kind})"


def _describe(value) -> str:
    """A parsed value for a message, never in full (it may be huge or deeply nested)."""
    if isinstance(value, _Number):
        text = value.text if len(value.text) <= 24 else f"{value.text[:12]}... ({len(value.text):,} characters)"
        return f"the number {text}"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return f"the string {_excerpt(value)}"
    return f"a {type(value).__name__}"


# ----------------------------------------------------------------------------- prompts


def prompt_problem(prompt) -> str | None:
    """What makes ``prompt`` invalid, as 'what is wrong; how to fix it', or None for a valid prompt: a string
    that, stripped of surrounding spaces and tabs, is non-empty, at most MAX_PROMPT_CHARACTERS long and free
    of refused characters (the module docstring lists them). A refused character's position counts from 1
    in the prompt as written (for a text file, the column in its line)."""
    if not isinstance(prompt, str):
        return f"{_describe(prompt)} is not a prompt: prompts must be strings (in JSON, text in double quotes)"
    stripped = prompt.strip(_BLANKS)
    if not stripped:
        return f"the prompt is empty or only whitespace ({_excerpt(prompt)}); remove it or write the prompt"
    if len(stripped) > MAX_PROMPT_CHARACTERS:
        return (f"the prompt {_excerpt(stripped)} is {len(stripped):,} characters long, over the limit of "
                f"{MAX_PROMPT_CHARACTERS:,} characters for a prompt; shorten it (text encoders read 77 tokens, a few hundred "
                "characters), or look for a missing line end or quote that joined many prompts into one")
    bad = _REFUSED.search(stripped)
    if bad is None:
        return None
    at = bad.start()
    column = len(prompt) - len(prompt.lstrip(_BLANKS)) + at + 1
    fix = "remove it or replace it with a space"
    if bad.group() == "\r":
        fix = "lines end only at \\n or \\r\\n, so remove this carriage return or save the file with \\n line ends"
    return (f"the prompt {_excerpt(stripped, at)} holds {_character(bad.group())} at character {column}; {fix} "
            "(prompts may not hold control characters, line or paragraph separators, surrogates, noncharacters "
            "or byte-order marks)")


def check_prompt(prompt, where: str) -> str:
    """``prompt`` stripped of surrounding spaces and tabs; CorpusError '<where>: <what is wrong; fix>' unless
    it is a valid prompt (see ``prompt_problem``)."""
    problem = prompt_problem(prompt)
    if problem:
        raise CorpusError(f"{where}: {problem}")
    return prompt.strip(_BLANKS)


def check_prompts(prompts, example: str) -> list[str]:
    """Prompts given directly (e.g. on a command line) rather than in a file, by the same rules as
    ``check_prompt``: one string counts as one prompt, and at least one is needed. ``example`` shows
    how to pass them, for the message when there is none. -> the prompts stripped of surrounding
    spaces and tabs; CorpusError 'prompt I of N: <what is wrong; fix>' for the first invalid one."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise CorpusError(f"no prompt given; pass one or more prompts, e.g. {example}")
    return [check_prompt(p, f"prompt {i + 1} of {len(prompts)}") for i, p in enumerate(prompts)]


def dedupe(prompts: list[str]) -> tuple[list[str], dict[str, int]]:
    """Keep each prompt's first occurrence. -> (distinct prompts in order, {prompt: extra occurrences})."""
    counts = Counter(prompts)
    return list(dict.fromkeys(prompts)), {p: n - 1 for p, n in counts.items() if n > 1}


# ----------------------------------------------------------------------------- files


def _read_text(path: Path, example: str) -> str:
    """The file's text, decoded as UTF-8, one leading byte-order mark dropped. CorpusError if the file cannot be
    read, is not UTF-8 or holds only whitespace (``example`` says what to write instead)."""
    shown = _printable(str(path))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"{shown}: the file cannot be read ({err.strerror or err}); check that it exists and "
                          "that you may read it (permissions)") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        utf16 = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise CorpusError(f"{shown}: line {line}: not valid UTF-8 ({err.reason} at byte {err.start}){utf16}; "
                          "save the file as UTF-8") from err
    if text.startswith(BOM):
        text = text[1:]
    if not text.strip(_BLANKS + "\r\n"):
        raise CorpusError(f"{shown}: the file is empty; {example}")
    return text


def _corpus(name: str, path: Path, raw: dict[str, list[str]], empty: str) -> Corpus:
    if not raw["train"]:
        raise CorpusError(f"{_printable(str(path))}: {empty}")
    splits, duplicates = {}, {}
    for split in SPLITS:
        splits[split], duplicates[split] = dedupe(raw[split])
    return Corpus(name, splits["train"], splits["val"], splits["test"], duplicates, {k: len(v) for k, v in raw.items()})


# ----------------------------------------------------------------------------- JSON


class _Number:
    """A JSON number, NaN or Infinity kept as its text: never converted, so a 5,000-digit integer cannot raise
    Python's ValueError (int-string conversion limit), and never mistaken for a prompt."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class _JsonObject(dict):
    """A JSON object that remembers its keys written more than once (a plain dict keeps the last silently)."""

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        self.repeated = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1] if len(self) < len(pairs) else []


_DECODER = json.JSONDecoder(object_pairs_hook=_JsonObject, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    return _JSON_SPACE.match(text, at).end()


def _line(text: str, at: int) -> int:
    return text.count("\n", 0, at) + 1


def _json_members(text: str) -> list[tuple[str, int, int]]:
    """(key, offset of the key, offset of the value) of each member of the top-level object, in file order.
    Only for text that parsed as an object; used to place an error."""
    at, members = _skip(text, _skip(text, 0) + 1), []
    while text[at] != "}":
        key, end = _DECODER.raw_decode(text, at)
        value = _skip(text, _skip(text, end) + 1)  # past the ':'
        members.append((key, at, value))
        at = _skip(text, _DECODER.raw_decode(text, value)[1])
        if text[at] == ",":
            at = _skip(text, at + 1)
    return members


def _json_items(text: str, at: int) -> list[int]:
    """Offsets of the items of the (parsed) JSON list that starts at offset ``at``."""
    at, items = _skip(text, at + 1), []
    while text[at] != "]":
        items.append(at)
        at = _skip(text, _DECODER.raw_decode(text, at)[1])
        if text[at] == ",":
            at = _skip(text, at + 1)
    return items


def _json_value_at(text: str, key: str, occurrence: int = 0) -> tuple[int, int]:
    """(offset of the key, offset of the value) of the ``occurrence``-th top-level member named ``key``."""
    return [(k_at, v_at) for k, k_at, v_at in _json_members(text) if k == key][occurrence]


def _parse_json(text: str, shown: str):
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{shown}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); fix the syntax "
                          f"there (a corpus is {_JSON_EXAMPLE})") from err
    except RecursionError:
        raise CorpusError(f"{shown}: the JSON is nested too deeply to read (lists or objects inside each other hundreds "
                          f"of levels deep); rewrite it as an object of flat lists of strings: {_JSON_EXAMPLE}") from None


def _check_json_keys(data: _JsonObject, text: str, shown: str) -> None:
    """CorpusError for a key written twice, a key other than train/val/test, or no train."""
    if data.repeated:
        key = data.repeated[0]
        line = _line(text, _json_value_at(text, key, 1)[0])
        raise CorpusError(f"{shown}: line {line}: the key {_excerpt(key)} appears more than once (JSON readers keep only "
                          "the last); merge its lists into one or remove the extra one")
    for key in data:
        if key not in SPLITS:
            close = difflib.get_close_matches(key, SPLITS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            line = _line(text, _json_value_at(text, key)[0])
            raise CorpusError(f"{shown}: line {line}: unknown key {_excerpt(key)}; {hint}a corpus object holds only "
                              "'train', 'val' and 'test' lists of prompts: rename or remove the key")
    if "train" not in data:
        raise CorpusError(f"{shown}: the corpus object has no 'train' list; add one (val and test are optional): {_JSON_EXAMPLE}")


def _load_json(path: Path, name: str) -> Corpus:
    """A JSON corpus: an object {"train": [prompt, ...], "val": [...], "test": [...]} (val and test optional)."""
    shown = _printable(str(path))
    text = _read_text(path, f"write the corpus as {_JSON_EXAMPLE}")
    data = _parse_json(text, shown)
    if not isinstance(data, dict):
        raise CorpusError(f"{shown}: line {_line(text, _skip(text, 0))}: the top level is {_describe(data)}, not an object; "
                          f"write the corpus as {_JSON_EXAMPLE} (a list of prompts goes in \"train\")")
    _check_json_keys(data, text, shown)
    raw = {}
    for split in SPLITS:
        items = data.get(split, [])
        if not isinstance(items, list):
            line = _line(text, _json_value_at(text, split)[1])
            raise CorpusError(f"{shown}: line {line}: '{split}' is {_describe(items)}, not a list; write it as a list "
                              f"of prompt strings, e.g. \"{split}\": [\"a red cube\", \"a blue ball\"]")
        checked = []
        for i, item in enumerate(items):
            problem = prompt_problem(item)
            if problem:
                line = _line(text, _json_items(text, _json_value_at(text, split)[1])[i])
                raise CorpusError(f"{shown}: line {line}, {split}[{i}]: {problem}")
            checked.append(item.strip(_BLANKS))
        raw[split] = checked
    return _corpus(name, path, raw, "the 'train' list is empty; a corpus needs at least one training prompt")


# ----------------------------------------------------------------------------- text and CSV


def _load_lines(path: Path) -> Corpus:
    """A text corpus: one prompt per line; a line ends at \\n or \\r\\n only; trailing blank lines are ignored."""
    shown = _printable(str(path))
    lines = _read_text(path, "write one prompt per line").split("\n")
    lines = [line[:-1] if n < len(lines) and line.endswith("\r") else line for n, line in enumerate(lines, 1)]
    while lines and not lines[-1].strip(_BLANKS):
        lines.pop()  # trailing blank lines at the end of the file
    prompts = [check_prompt(line, f"{shown}: line {n}") for n, line in enumerate(lines, 1)]
    return _corpus(path.stem, path, {"train": prompts, "val": [], "test": []}, "the file holds no prompts; write one prompt per line")


def _csv_problem(err: csv.Error) -> str:
    """What a csv.Error means for a corpus file, and the fix."""
    message = str(err)
    if message.startswith("unexpected end of data"):
        return "a quoted field is not closed before the end of the file; close its quote (a quote inside a quoted field is written \"\")"
    if message.startswith("',' expected after '\"'"):
        return ("text follows the closing quote of a quoted field; a field that starts with a quote must end at its "
                "closing quote, so write a quote inside it as \"\"")
    if message.startswith("new-line character seen in unquoted field"):
        return ("a carriage return (U+000D) that is not part of a \\r\\n line end; lines end only at \\n or \\r\\n, so "
                "remove it or save the file with \\n line ends")
    if message.startswith("field larger than field limit"):
        return (f"a field is longer than the csv module's limit of {csv.field_size_limit():,} characters, and a prompt may "
                f"have at most {MAX_PROMPT_CHARACTERS:,}; shorten it, or close the quote that made the rest of the file one field")
    return f"{message}; fix the line (RFC 4180: fields separated by commas, quoted with \" when they hold a comma, quote or line end)"


def _csv_records(text: str, shown: str):
    """(line where the record starts, fields) for each CSV record; CorpusError naming the line for malformed CSV."""
    reader = csv.reader(io.StringIO(text), strict=True)  # StringIO splits lines at \n only
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise CorpusError(f"{shown}: line {line}: not valid CSV: {_csv_problem(err)}") from err
        yield line, row


def _csv_column(header: list[str], column: str | None, shown: str) -> tuple[str, int]:
    """(name, index) of the prompt column: ``column``, else the first of prompt, caption, text; it must appear once."""
    names = ", ".join(_excerpt(c, width=40) for c in header[:20]) + (f", ... ({len(header) - 20} more)" if len(header) > 20 else "")
    if column is None:
        column = next((c for c in ("prompt", "caption", "text") if c in header), None)
        if column is None:
            raise CorpusError(f"{shown}: line 1: the header has no column 'prompt', 'caption' or 'text' (columns: {names}); "
                              f"name the prompt column as {shown}#COLUMN, or add a header line 'prompt' if the file has none")
    elif column not in header:
        close = difflib.get_close_matches(column, header, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CorpusError(f"{shown}: line 1: no column {column!r} (columns: {names}); {hint}name one of them as {shown}#COLUMN")
    where = [i for i, c in enumerate(header) if c == column]
    if len(where) > 1:
        raise CorpusError(f"{shown}: line 1: the header names the column {column!r} {len(where)} times (fields "
                          f"{', '.join(str(i + 1) for i in where)}); rename or remove all but one, so that it is clear which holds the prompts")
    return column, where[0]


def _load_csv(path: Path, column: str | None) -> Corpus:
    """A CSV corpus (RFC 4180): a header line, then one record per prompt; the prompt column as ``_csv_column`` picks it."""
    shown = _printable(str(path))
    text = _read_text(path, "write a header line naming the prompt column (e.g. prompt), then one prompt per line")
    records = _csv_records(text, shown)
    _, header = next(records, (1, []))
    if not header:
        raise CorpusError(f"{shown}: line 1 is blank; the first line of a CSV corpus is its header, naming the prompt column (e.g. prompt)")
    column, index = _csv_column(header, column, shown)
    prompts, blank = [], None
    for line, row in records:
        if not row:
            blank = blank or line
            continue
        if blank:
            raise CorpusError(f"{shown}: line {blank} is blank; remove it (blank lines are allowed only at the end of the file)")
        if len(row) != len(header):
            raise CorpusError(f"{shown}: line {line} has {len(row)} field(s) but the header has {len(header)}; give every line "
                              "the header's fields, and quote a prompt that holds a comma (\"a red apple, sliced\")")
        prompts.append(check_prompt(row[index], f"{shown}: line {line}, column {column!r}"))
    return _corpus(path.stem, path, {"train": prompts, "val": [], "test": []},
                   "no prompt lines under the header; write one prompt per line after it")


# ----------------------------------------------------------------------------- specs


def _split_spec(spec: str) -> tuple[str, str | None]:
    """'path.csv#column' -> (path, column); any other spec, or an existing file whose name holds '.csv#' -> (spec, None)."""
    at = spec.rfind(".csv#")
    if at < 0 or os.path.isfile(spec):
        return spec, None
    return spec[: at + 4], spec[at + 5 :]


def _expand(path_text: str) -> Path:
    try:
        return Path(path_text).expanduser()
    except RuntimeError:  # '~name' with no such user: keep the path as written
        return Path(path_text)


def _check_is_file(path: Path) -> None:
    """CorpusError unless ``path`` is an existing regular file (or a link to one)."""
    shown = _printable(str(path))
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise CorpusError(f"{shown}: the corpus file does not exist; check the path (a relative path starts in the "
                          "current folder)") from None
    except OSError as err:
        raise CorpusError(f"{shown}: the corpus file cannot be reached ({err.strerror or err}); check the path and the "
                          "permissions of its folders") from err
    if stat.S_ISDIR(mode):
        raise CorpusError(f"{shown}: is a folder, not a file; give the path of a .json, .txt or .csv corpus file")
    if not stat.S_ISREG(mode):
        raise CorpusError(f"{shown}: is not a regular file (a pipe, device or socket); save the prompts in a .json, .txt "
                          "or .csv file and give its path")


def load_file(spec: str) -> Corpus:
    """A user corpus file: .json, .txt (one prompt per line) or .csv[#column]. Anything that cannot be read as
    prompts (see Validation in the module docstring) raises CorpusError naming the file."""
    if "\0" in spec:
        raise CorpusError(f"{_printable(spec)}: the corpus path holds a NUL character (U+0000), which no file name can "
                          "contain; check how the path was written")
    path_text, column = _split_spec(spec)
    if column == "":
        raise CorpusError(f"{_printable(spec)}: no column name after '#'; write {_printable(path_text)}#COLUMN, or leave "
                          "out the '#' to use the column prompt, caption or text")
    path = _expand(path_text)
    _check_is_file(path)
    if path.suffix == ".json":
        return _load_json(path, path.stem)
    if path.suffix == ".txt":
        return _load_lines(path)
    if path.suffix == ".csv":
        return _load_csv(path, column)
    raise CorpusError(f"{_printable(str(path))}: unknown corpus format {path.suffix!r}; use .json (train/val/test lists), "
                      ".txt or .csv")


FILE_SUFFIXES = (".json", ".txt", ".csv")


def is_file_spec(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) or ".csv#" in name


def load_corpus(name: str, directory: str | None = None) -> Corpus:
    """A named corpus from the catalog, a corpus file's path, or "prompt:TEXT" (that one prompt in every split, the
    corpus of a per-prompt run). -> Corpus with train/val/test lists."""
    prompt = single_prompt(name)
    if prompt is not None:
        return Corpus(name, [prompt], [prompt], [prompt])
    entries = catalog()
    if name not in entries:
        if is_file_spec(name):
            return load_file(name)
        raise CorpusError(f"unknown corpus {name!r}; use one of the known corpora ({', '.join(entries)}), pass the path of a "
                          ".json, .txt or .csv file, or write prompt:TEXT for one prompt (`amortized3d corpus list` shows them)")
    entry = entries[name]
    if entry["source"] == "shapeworld":
        splits = shapeworld_corpus(name)
        return Corpus(name, splits["train"], splits["val"], splits["test"])
    folder = corpus_dir(directory)
    path = folder / entry["file"]
    if not path.is_file():
        raise CorpusError(
            f"corpus {name!r} needs the file {entry['file']} in {folder}; download it with the reference prompt libraries "
            "and point --corpus-dir (or AMORTIZED3D_CORPORA) at its folder"
        )
    return _load_json(path, name)


def corpus_info(corpus: Corpus, count_tokens=None, max_tokens: int = 77) -> dict:
    """Split sizes (as in the file and distinct), duplicates, prompt length statistics and, given
    ``count_tokens(prompts) -> [n]`` (tokens with the begin/end tokens), the prompts over ``max_tokens``."""
    info: dict = {"name": corpus.name, "splits": {}}
    for split in SPLITS:
        prompts = corpus.split(split)
        dropped = corpus.duplicates.get(split, {})
        row = {"prompts": corpus.raw_sizes.get(split, len(prompts)), "distinct": len(prompts),
               "duplicates_dropped": sum(dropped.values())}
        if dropped:
            top, n = max(dropped.items(), key=lambda kv: kv[1])
            row["most_repeated"] = {"prompt": top, "occurrences": n + 1}
        if prompts:
            chars = sorted(len(p) for p in prompts)
            words = sorted(len(p.split()) for p in prompts)
            row["characters"] = {"min": chars[0], "median": chars[len(chars) // 2], "max": chars[-1]}
            row["words"] = {"min": words[0], "median": words[len(words) // 2], "max": words[-1]}
            row["non_ascii_distinct"] = sum(not p.isascii() for p in prompts)
            if count_tokens is not None:
                long = [p for p, n in zip(prompts, count_tokens(prompts)) if n > max_tokens]
                row[f"over_{max_tokens}_tokens"] = {"count": len(long), "examples": [p[:80] for p in long[:3]]}
        info["splits"][split] = row
    return info


def export_corpus(corpus: Corpus, path: str | Path) -> Path:
    """Write ``corpus`` as a JSON corpus file {"train": [...], "val": [...], "test": [...]} (UTF-8) that load_file
    reads back; -> the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"train": corpus.train, "val": corpus.val, "test": corpus.test}, f, ensure_ascii=False, indent=0)
    return path
