"""`python -m diffquant ...` (and `accelerate launch -m diffquant run ...`): the `diffquant` command."""

import sys

from .cli import main

sys.exit(main())
