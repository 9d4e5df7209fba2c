"""Error messages of the command line: an exception on one line, an API message in the command's flags."""

from __future__ import annotations

import argparse
import re

#: A flag of the command line: its long option, its ``--no-`` form, its metavar.
Flag = tuple[str, str | None, str | tuple[str, ...] | None]


def one_line(exc: BaseException) -> str:
    """The message of an exception on one line (a KeyError's message without its quotes)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]
    else:
        msg = str(exc)
    msg = " ".join(msg.split())
    return msg or type(exc).__name__


#: ``name=value`` in an error of the Python API (a parameter, as the API's messages name them: ``weights=<path>``).
_PARAM = re.compile(r"(?<![\w.\-])([a-z][a-z0-9_]*)=(<[^>]*>|'[^']*'|\"[^\"]*\"|[^\s,;)]*)")
#: A Python call quoted in a message (``agl.tl.agl_fit(adata, key_added=...)``): its arguments stay as written.
_CALL = re.compile(r"\b[\w.]+\([^()]*\)")


def command_flags(parser: argparse.ArgumentParser, command: str | None) -> dict[str, Flag]:
    """The flags of ``command`` by the parameter they set, e.g. ``{"weights": ("--weights", None, "WEIGHTS")}``."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            parsers.append(action.choices[command])
    out: dict[str, Flag] = {}
    for p in parsers:
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            if longs and action.dest not in ("help", "version"):
                neg = next((o for o in action.option_strings if o.startswith("--no-")), None)
                takes = action.nargs != 0 and neg is None
                metavar = (action.metavar or action.dest.upper()) if takes else None
                out[action.dest] = (longs[0], neg, metavar)
    return out


def cli_message(message: str, flags: dict[str, Flag]) -> str:
    """An error of the Python API in the command line's words: ``Pass weights=<path>`` -> ``Pass --weights <path>``."""
    calls = [m.span() for m in _CALL.finditer(message)]

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags or any(a <= m.start() < b for a, b in calls):
            return m.group(0)
        pos, neg, metavar = flags[name]
        tail = ""
        while value and value[-1] in ".:" and not value.startswith(("<", "'", '"')):
            value, tail = value[:-1], value[-1] + tail
        value = value.strip("'\"")
        if value in ("True", "true"):
            return pos + tail
        if value in ("False", "false") and neg:
            return neg + tail
        value = value or metavar
        return (f"{pos} {value}" if value else pos) + tail

    return _PARAM.sub(flag, message)
