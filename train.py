"""Train a prompt-amortized text-to-3D generator.

    accelerate launch train.py --corpus shapeworld-16
    python train.py --corpus shapeworld-16 train.steps=500 distill.method=sds
"""

import sys

from amortized3d.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
