"""``python -m sparse_vdit.cli``: the same as the ``sparse-vdit`` command."""
import sys

from . import main

sys.exit(main())
