"""`python -m diffquant.peers`: diffquant's recipes beside the peer libraries (see diffquant.peers.eight)."""

import sys

from diffquant.peers.eight import main

sys.exit(main())
