"""``python -m control_plane``: the ``keyward`` command."""

import sys

from control_plane.cli import main

if __name__ == "__main__":  # not when a spawned worker (the policy validator) re-imports it
    sys.exit(main())
