"""Showing strings from a checkpoint (tensor names, metadata, shard paths) without letting them act.

A name is data chosen by whoever made the file. Printed raw it could move the cursor or recolour a
terminal (ESC sequences), forge a line of a CI log (a newline then ``::error::...``, a GitHub
Actions workflow command), inject rich markup, run a formula in a spreadsheet, or break the XML
and HTML reports. Every renderer passes such strings through one function here:

- :func:`visible`: every character ``str.isprintable()`` rejects (C0/C1 controls, DEL, line and
  paragraph separators, bidi overrides and other format characters, lone surrogates from
  undecodable file names, non-ASCII spaces) is shown as its Python escape (``\\x1b``, ``\\n``,
  ``\\u202e``). Backslashes are kept as they are.
- :func:`one_line`: :func:`visible`, and no ``::`` either (shown ``:\\x3a``), so that a name
  folded across lines by a table can never start a line with a workflow command.
- :func:`markup`, :func:`md_code`, :func:`md_text`, :func:`csv_cell`, :func:`xml_text`,
  :func:`html_text`: :func:`one_line` or :func:`visible` plus the quoting of each format.

JSON needs none of this: ``json.dumps`` escapes control characters, so JSON keeps exact names.
"""

from __future__ import annotations

import html
import re

from rich.markup import escape as _rich_escape

__all__ = [
    "csv_cell",
    "html_text",
    "markup",
    "md_cell",
    "md_code",
    "md_text",
    "one_line",
    "visible",
    "xml_text",
]

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_WORKFLOW = re.compile("::")
# ASCII punctuation that starts inline Markdown (emphasis, links, HTML, code, tables, strikethrough).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&!])")
# Spreadsheet formula triggers at the start of a cell (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# XML 1.0's Char production; anything else cannot appear in a document, not even as &#...;.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def visible(s: object) -> str:
    """``s`` with every non-printable character (controls, separators, bidi, surrogates) escaped."""
    s = str(s)
    if s.isprintable():  # the common case, checked in C
        return s
    return "".join(ch if ch.isprintable() or ch == " " else _escape_char(ch) for ch in s)


def one_line(s: object) -> str:
    """:func:`visible`, with ``::`` shown as ``:\\x3a``: safe anywhere in a line of a log."""
    text = visible(s)
    return _WORKFLOW.sub(r":\\x3a", text) if "::" in text else text


def markup(s: object) -> str:
    """For an f-string printed by rich: :func:`one_line` with its markup (``[bold]``) escaped."""
    return _rich_escape(one_line(s))


def md_code(s: object) -> str:
    """A Markdown code span showing ``s`` literally, fenced by more backticks than it holds."""
    text = one_line(s)
    if "`" not in text:
        return f"`{text}`"
    longest = max(len(run) for run in re.findall("`+", text))
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_cell(s: str) -> str:
    """A rendered Markdown fragment as a table cell: its pipes escaped (GFM splits cells first)."""
    return s.replace("|", "\\|")


def md_text(s: object) -> str:
    """Prose for Markdown (a note quoting a name): :func:`one_line`, inline syntax backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", one_line(s))


def csv_cell(v: object) -> object:
    """A CSV value: numbers as they are; text :func:`one_line`, and prefixed with ``'`` when a
    spreadsheet would read it as a formula (starts with = + - @, tab or CR)."""
    if not isinstance(v, str):
        return v
    s = one_line(v)
    return "'" + s if s.startswith(_FORMULA_START) else s


def xml_text(s: object) -> str:
    """Text or an attribute value that is valid XML 1.0 whatever ``s`` holds (the serializer escapes <&>)."""
    return _NOT_XML.sub(lambda m: _escape_char(m.group()), visible(s))


def html_text(s: object) -> str:
    """HTML-escaped :func:`visible` text, safe in element content and quoted attributes."""
    return html.escape(visible(s), quote=True)
