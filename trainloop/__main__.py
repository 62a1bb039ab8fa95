"""``python -m trainloop`` is the ``trainloop`` command (torchrun launches it this way)."""

import sys

from trainloop._console import main

sys.exit(main())
