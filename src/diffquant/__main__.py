"""`python -m diffquant ...` (and `accelerate launch -m diffquant run ...`): the `diffquant` command."""

import sys

from diffquant.cli.main import main

sys.exit(main())
