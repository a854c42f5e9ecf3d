"""`python -m megatron_swift.plan`: see megatron_swift/plan/cli.py."""

import sys

from megatron_swift.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
