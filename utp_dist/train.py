"""`python -m utp_dist.train CONFIG.yaml [key=value ...]`: runs the train command, utp_dist.train_command.main.

It defines nothing to import: importing this module would make the package attribute `utp_dist.train` this module
instead of the function train(cfg) that `from utp_dist import train` gives.
"""

import sys

if __name__ == "__main__":
    from utp_dist.train_command import main

    sys.exit(main())
