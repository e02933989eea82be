"""`python -m samed_adapter.cli`."""

import sys

from .main import main

sys.exit(main())
