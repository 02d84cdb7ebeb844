"""``python -m nlsr.train ...`` is ``nlsr train ...``; torchrun takes it as ``-m nlsr.train``."""

from __future__ import annotations

import sys

from nlsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
