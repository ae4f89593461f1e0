"""Seeded malformed inputs for loader tests (a plain module, not a test file).

    malformed_corpus_files(seed, n) -> [(file name, bytes), ...]

Each file starts as a valid JSON, text or CSV corpus (prompts with commas, quotes, accents, emoji and
no-break spaces), gets at most one format-aware mutation (deep nesting, huge numbers, NaN, escaped
surrogates, duplicate keys, misspelt keys, wrong types; duplicate or missing CSV columns, short and
long rows, unclosed quotes; over-long prompts) and then up to two byte-level ones (truncation, bit
flips, inserted control characters, line and paragraph separators, BOMs, invalid UTF-8, CRLF or
lone-CR line ends, UTF-16, deleted or repeated chunks). The file name's suffix is the format; its stem
lists the mutations applied. The same seed gives the same files.
"""

from __future__ import annotations

import csv
import io
import json
import random

PROMPTS = [
    "a red cube", "a frog wearing a sweater", "a café table on a terrace", 'a 12" pizza', "a red apple, sliced",
    "un gâteau au chocolat", "a 😀 smiling ball", "a wooden chair\u00a0with arms", "a family 👨\u200d👩\u200d👧 of robots",
    "an owl, a cat and a dog", "a \"quoted\" statue", "a lamp; on a desk", "ein grüner Baum", "富士山の模型",
]
INSERTS = [  # byte strings a mutation inserts at a random offset
    b"\x00", b"\x07", b"\t", b"\x0b", b"\x0c", b"\r", b"\n", b"\r\n", b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\x7f",
    "\x85".encode(), "\u2028".encode(), "\u2029".encode(), "\ufeff".encode(), "\ufffe".encode(), "\U0010ffff".encode(),
    b"\xed\xa0\x80", b"\xff", b"\xc3", b'"', b",", b"\\", b"\\ud800", b"\\u0000", b"\\u2028", b"[", b"]", b"{", b"}",
    b":", b"   ", "\u3000".encode(), "\u200b".encode(),
]
DEEP = 100_000


def _valid(rng: random.Random, kind: str) -> dict:
    """A valid corpus as parts the mutations edit: JSON members (key, raw item texts), or text lines, or CSV rows."""
    def pick(k):
        return rng.sample(PROMPTS, k)

    if kind == "json":
        ascii_only = rng.random() < 0.5
        items = {s: [json.dumps(p, ensure_ascii=ascii_only) for p in pick(rng.randint(1, 5))] for s in ("train", "val", "test")}
        members = [(json.dumps(s), items[s]) for s in ("train", "val", "test") if s == "train" or rng.random() < 0.7]
        return {"members": members, "top": "object"}
    if kind == "txt":
        return {"lines": pick(rng.randint(1, 6))}
    header = rng.choice([["prompt"], ["uid", "prompt"], ["caption", "uid"], ["text", "score", "uid"]])
    rows = [[p if name in ("prompt", "caption", "text") else str(rng.randint(0, 999)) for name in header]
            for p in pick(rng.randint(1, 6))]
    return {"header": header, "rows": rows}


def _render(kind: str, parts: dict, rng: random.Random) -> bytes:
    if kind == "json":
        sep = rng.choice([", ", ",\n  ", ","])
        body = [f"{key}: {raw if isinstance(raw, str) else '[' + sep.join(raw) + ']'}" for key, raw in parts["members"]]
        text = "{" + sep.join(body) + "}" if parts["top"] == "object" else "[" + sep.join(parts["members"][0][1]) + "]"
        return text.encode("utf-8")
    if kind == "txt":
        return ("\n".join(parts["lines"]) + "\n").encode("utf-8")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(parts["header"])
    writer.writerows(parts["rows"])
    return out.getvalue().encode("utf-8")


def _json_mutation(rng: random.Random, parts: dict) -> str:
    members = parts["members"]
    key, items = members[0]
    choice = rng.choice(["deep", "deep_open", "huge_int", "constant", "float", "surrogate", "duplicate_key",
                         "misspelt_key", "split_type", "item_type", "top_list", "no_train", "long", "nested_item"])
    if choice == "deep":
        members[0] = (key, "[" * DEEP + "]" * DEEP)
    elif choice == "deep_open":
        members[0] = (key, "[" * DEEP)
    elif choice == "huge_int":
        items.insert(rng.randint(0, len(items)), rng.choice(["", "-"]) + "9" * rng.choice([5000, 20000]))
    elif choice == "constant":
        items.insert(rng.randint(0, len(items)), rng.choice(["NaN", "Infinity", "-Infinity"]))
    elif choice == "float":
        items.insert(rng.randint(0, len(items)), rng.choice(["1e999", "-0.0", "1.5", "1" + "0" * 400 + ".5"]))
    elif choice == "surrogate":
        items[rng.randrange(len(items))] = json.dumps("a lone " + rng.choice(["\ud800", "\udfff", "\udbff"]) + " half")
    elif choice == "duplicate_key":
        members.append((key, list(items)))
    elif choice == "misspelt_key":
        members.append((rng.choice(['"tset"', '"vall"', '"Train"', '"prompts"']), ['"a red cube"']))
    elif choice == "split_type":
        members[0] = (key, rng.choice(['{"a": "b"}', '"a red cube"', "3", "null", "true"]))
    elif choice == "item_type":
        items[rng.randrange(len(items))] = rng.choice(["null", "true", "false", "[]", '["a"]', "{}", '{"prompt": "a"}', "0"])
    elif choice == "top_list":
        parts["top"] = "list"
    elif choice == "no_train":
        members[0] = ('"val"', items)
    elif choice == "long":
        items.append(json.dumps("word " * rng.choice([2001, 30000])))
    else:
        items.append("[" * 300 + '"a"' + "]" * 300)
    return choice


def _csv_mutation(rng: random.Random, parts: dict) -> bytes | str:
    header, rows = parts["header"], parts["rows"]
    choice = rng.choice(["duplicate_column", "short_row", "long_row", "no_header", "unquoted_comma", "huge_field",
                         "long_prompt", "blank_line", "unclosed_quote", "after_quote"])
    if choice == "duplicate_column":
        header.append(rng.choice([header[0], "prompt", "uid"]))
        for row in rows:
            row.append("a duplicate")
    elif choice == "short_row":
        rows[rng.randrange(len(rows))].pop()
    elif choice == "long_row":
        rows[rng.randrange(len(rows))].append("extra")
    elif choice == "no_header":
        parts["header"] = rows.pop(0) if len(rows) > 1 else ["a red cube"]
    elif choice == "huge_field":
        rows[rng.randrange(len(rows))][0] = "x" * 140_000
    elif choice == "long_prompt":
        rows[rng.randrange(len(rows))][-1] = "y " * 6000
    return choice


def _raw_csv_mutation(rng: random.Random, data: bytes, choice: str) -> bytes:
    """CSV mutations that csv.writer cannot write: bare commas, blank lines, broken quotes."""
    lines = data.split(b"\n")
    at = rng.randint(1, max(1, len(lines) - 2))
    if choice == "unquoted_comma":
        lines[at] = lines[at] + b", sliced"
    elif choice == "blank_line":
        lines.insert(at, b"")
    elif choice == "unclosed_quote":
        lines[at] = b'"' + lines[at]
    elif choice == "after_quote":
        lines[at] = b'"a frog" big' + (b"," + lines[at].split(b",", 1)[1] if b"," in lines[at] else b"")
    return b"\n".join(lines)


def _byte_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    choice = rng.choice(["truncate", "flip", "insert", "insert", "insert", "bom", "bom2", "crlf", "cr", "utf16", "delete",
                         "repeat", "empty", "long_line"])
    at = rng.randint(0, len(data))
    if choice == "truncate":
        return choice, data[:at]
    if choice == "flip" and data:
        i = rng.randrange(len(data))
        return choice, data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if choice == "insert":
        return choice, data[:at] + rng.choice(INSERTS) + data[at:]
    if choice == "bom":
        return choice, b"\xef\xbb\xbf" + data
    if choice == "bom2":
        return choice, b"\xef\xbb\xbf\xef\xbb\xbf" + data
    if choice == "crlf":
        return choice, data.replace(b"\n", b"\r\n")
    if choice == "cr":
        return choice, data.replace(b"\n", b"\r")
    if choice == "utf16":
        return choice, data.decode("utf-8", "replace").encode("utf-16")
    if choice == "delete":
        return choice, data[:at] + data[min(len(data), at + rng.randint(1, 20)) :]
    if choice == "repeat":
        return choice, data[:at] + data[at : at + rng.randint(1, 30)] + data[at:]
    if choice == "empty":
        return choice, rng.choice([b"", b"\n", b"  \n\n", b"\xef\xbb\xbf", b"\r\n"])
    return "long_line", data[:at] + b"z" * rng.choice([10_001, 140_000]) + data[at:]


def malformed_corpus_files(seed: int, n: int) -> list[tuple[str, bytes]]:
    """``n`` (file name, bytes) pairs: valid corpora of each format, mutated (see the module docstring)."""
    rng = random.Random(seed)
    files = []
    for i in range(n):
        kind = rng.choice(["json", "txt", "csv"])
        parts, names = _valid(rng, kind), []
        raw_csv = None
        if rng.random() < 0.6 and kind != "txt":
            names.append(_json_mutation(rng, parts) if kind == "json" else _csv_mutation(rng, parts))
            raw_csv = names[-1] if kind == "csv" else None
        data = _render(kind, parts, rng)
        if raw_csv in ("unquoted_comma", "blank_line", "unclosed_quote", "after_quote"):
            data = _raw_csv_mutation(rng, data, raw_csv)
        for _ in range(rng.choice([0, 1, 1, 2]) if names else rng.choice([1, 1, 2])):
            name, data = _byte_mutation(rng, data)
            names.append(name)
        files.append((f"{i:03d}-{'-'.join(names) or 'valid'}.{kind}", data))
    return files
