"""`python -m utp_dist.train CONFIG.yaml [key=value ...]`: the train command (it lives in utp_dist.train_command).

Nothing imports this module: importing it would make the package attribute `utp_dist.train` this module instead of
the function train(cfg) that `from utp_dist import train` gives.
"""

import sys

from utp_dist.train_command import main

if __name__ == "__main__":
    sys.exit(main())
