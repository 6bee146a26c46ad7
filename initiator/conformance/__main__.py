"""``python -m initiator.conformance``: the same as ``iscsi-conformance``."""

import sys

from .runner import main

sys.exit(main())
