"""Entrypoint for `ray job submit ... -- python jobs/train.py --config jobs/configs/demo.yaml`.

Identical to `raydir train`; inside a submitted job Ray connects to the cluster it runs on.
"""

import sys

from raydir.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
