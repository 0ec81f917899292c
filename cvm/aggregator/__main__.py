"""``python -m cvm.aggregator``: the round's aggregator service (``cvm.aggregator.server``)."""

import sys

from cvm.aggregator.server import main

sys.exit(main())
