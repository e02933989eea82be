"""Text from files, shown on a terminal: control characters escaped.

Class names, adapter names and file names come from files anyone can write. Printed raw, an
escape sequence in a class name can clear the screen, move the cursor or retitle the window,
and a bidirectional override can make `evil.exe` read as `exe.live`. `printable` shows each
such character as a Python-style escape (`\\x1b`, `\\u202e`) so the text is shown as it is,
never obeyed.
"""

from __future__ import annotations

import os
from typing import Union

# Bidirectional formatting characters (Unicode's Bidi_Control): embeddings and overrides
# (U+202A..U+202E), isolates (U+2066..U+2069) and the marks (U+061C, U+200E, U+200F); plus the
# line and paragraph separators, which start a new line on some terminals.
_BIDI_AND_SEPARATORS = frozenset(
    [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
)


_SHORT = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}  # as Python writes them


def _escaped(code: int) -> bool:
    return code < 0x20 or 0x7F <= code <= 0x9F or code in _BIDI_AND_SEPARATORS


def printable(text: Union[str, os.PathLike, object]) -> str:
    """`text` with every character a terminal would obey rather than show escaped.

    Escaped: the C0 controls (U+0000..U+001F, newline and tab included: a name is one line),
    DEL, the C1 controls (U+0080..U+009F) and the bidirectional formatting characters; as
    `\\n`, `\\t`, `\\r`, else `\\xNN` below U+0100 and `\\uNNNN` above. Everything else,
    accented letters and CJK included, is kept. Paths are shown by `os.fspath`, other objects
    by their `str`.

    Example: `printable("liver\\x1b[2J")` is `'liver\\\\x1b[2J'` (shown as `liver\\x1b[2J`).
    """
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    text = str(text)
    if not any(_escaped(ord(c)) for c in text):  # the usual case: no copy
        return text
    return "".join(_escape(c) if _escaped(ord(c)) else c for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


__all__ = ["printable"]
