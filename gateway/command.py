"""The `image-gateway` command (and `python -m gateway`), light enough to take a Ctrl-C.

Importing the servers takes the first 0.4 s or so of a start, before the gateway has any signal
handling of its own: a Ctrl-C then, at a start changed one's mind about, printed a
KeyboardInterrupt traceback of some thirty lines from inside whichever library was loading.
Nothing is serving yet, so there is nothing to drain either: it ends the command quietly, as a
shell reports SIGINT (130). From the gateway's own handling on, Ctrl-C drains as usual.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from gateway import serve

        return serve.main(argv)
    except KeyboardInterrupt:
        return 130
