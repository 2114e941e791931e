"""`python -m utp_dist.submit`: the entry point of the sweep commands (they live in utp_dist.sweep.submit)."""

import sys

from utp_dist.sweep.submit import main

if __name__ == "__main__":
    sys.exit(main())
