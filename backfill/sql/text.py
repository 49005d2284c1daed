"""Quoting: identifiers, literals, and the lexical check of a job's SQL fragments."""

from __future__ import annotations

import re

SCHEMA = "backfill"


def ident(name: str) -> str:
    """Quote one identifier."""
    return '"' + name.replace('"', '""') + '"'


_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def fragment_problem(text: str) -> str | None:
    """Why a ``set``/``where`` fragment could break out of its place in a statement, or None.

    A fragment is pasted into the batch statement; if it closed a parenthesis it did not open,
    or left a quote or comment open for the text after it, it could swallow the batch's own
    key range (an UPDATE of the whole table). So: parentheses balanced, every string, quoted
    identifier and ``/* */`` comment closed, no ``--`` comment (it would run to the end of the
    statement's line), no ``;``. Lexical only; the server checks the rest.
    """
    depth, i, n = 0, 0, len(text)
    while i < n:
        c, pair = text[i], text[i : i + 2]
        if c in "'\"":  # 'string', E'string' (backslash escapes), "identifier"; doubled quotes
            backslash = (
                c == "'"
                and i > 0
                and text[i - 1] in "eE"
                and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
            )
            i += 1
            while (i < n and text[i] != c) or text[i : i + 2] == c * 2:
                i += 2 if text[i] == c or (backslash and text[i] == "\\") else 1
            if i >= n:
                return "has an unterminated quote"
        elif c == "$" and (m := _DOLLAR.match(text, i)) and not (i and text[i - 1].isalnum()):
            end = text.find(m.group(0), m.end())
            if end < 0:
                return "has an unterminated dollar-quoted string"
            i = end + len(m.group(0)) - 1
        elif pair == "/*":
            nested, i = 1, i + 2
            while i < n and nested:
                nested += {"/*": 1, "*/": -1}.get(text[i : i + 2], 0)
                i += 2 if text[i : i + 2] in ("/*", "*/") else 1
            if nested:
                return "has an unterminated /* comment"
            continue
        elif pair == "*/":
            return "closes a comment it did not open"
        elif pair == "--":
            return "must not contain a -- comment (use /* */)"
        elif c == ";":
            return "must be a single SQL expression without ';'"
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return "closes a parenthesis it did not open"
        i += 1
    return "has an unclosed parenthesis" if depth else None


def literal(value: str) -> str:
    """Quote one string literal (for ``EXECUTE`` in a group, where no parameters exist)."""
    return "'" + value.replace("'", "''") + "'"


def explain(statement: str, *, analyze: bool = False) -> str:
    return f"EXPLAIN (ANALYZE {str(analyze).upper()}, COSTS TRUE) {statement}"
