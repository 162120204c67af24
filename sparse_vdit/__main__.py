"""``python -m sparse_vdit``: the same as the ``sparse-vdit`` command."""
import sys

from .cli import main

sys.exit(main())
