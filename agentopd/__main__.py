"""``python -m agentopd`` runs the ``agentopd`` command; this is what
``torchrun --nproc_per_node=N -m agentopd train ...`` starts on every rank."""

import sys

from agentopd.cli import main

if __name__ == "__main__":
    sys.exit(main())
