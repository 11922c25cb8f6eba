"""`python -m tuner.grid` from a checkout runs `python -m nfnet_keras.tuner.grid` (same flags)."""

import sys

from nfnet_keras.tuner.grid import main

if __name__ == "__main__":
    sys.exit(main())
