"""What every benchmark script does with its finished report: print it, and write it to
``--out`` when one was given (the committed ``.md`` files are such outputs)."""

from __future__ import annotations


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
