#!/usr/bin/env python
"""The main job: ``python train.py RECIPE.yaml [--set KEY=VALUE ...] [--resume [--trust-checkpoint]]``."""
import sys

from distill.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
