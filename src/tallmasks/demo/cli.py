"""``python -m tallmasks.demo [--nonlocal] ...``: logging for the demo, then the local or the non-local experiment."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tallmasks").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # the demo model is random-initialized on purpose
        handler.addFilter(lambda record: "No pretrained weights loaded" not in record.getMessage())
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--nonlocal" in argv:
        from tallmasks.demo.non_local import main as nonlocal_main

        return nonlocal_main([a for a in argv if a != "--nonlocal"])
    from tallmasks.demo.local import main as local_main

    return local_main(argv)
