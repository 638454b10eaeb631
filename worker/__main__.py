"""`python -m vbatch.worker`: the same as `vbatch worker`."""

import sys

from vbatch.worker.main import main

if __name__ == "__main__":
    sys.exit(main())
