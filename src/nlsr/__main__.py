"""``python -m nlsr``: the same as the ``nlsr`` command."""

import sys

from nlsr.cli import main

sys.exit(main())
