"""``python -m edge_agent``: the same as the ``edge-agent`` console script."""

import sys

from edge_agent.cli import main

# The guard matters: preprocessing workers start by forkserver, which imports the parent's __main__
# module (as __mp_main__) in every worker; without it each worker would run the CLI again.
if __name__ == "__main__":
    sys.exit(main())
