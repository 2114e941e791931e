"""`python -m utp_dist.data check ROOT`: the command lives in utp_dist.data.check."""

import sys

from utp_dist.data.check import main

if __name__ == "__main__":
    sys.exit(main())
