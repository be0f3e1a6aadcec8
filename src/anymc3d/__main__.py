"""``python -m anymc3d ...`` - the same command as ``anymc3d ...``; the form ``torchrun`` launches:

    torchrun --nproc_per_node 2 -m anymc3d train manifest.csv --out runs/x
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
