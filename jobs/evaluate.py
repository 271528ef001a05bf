"""Entrypoint for `ray job submit ... -- python jobs/evaluate.py --model models:/NAME@champion ...`.

Identical to `raydir evaluate`; inside a submitted job Ray connects to the cluster it runs on and
MLflow to $MLFLOW_TRACKING_URI (set on every node by cluster.yaml, or via --runtime-env-json).
"""

import sys

from raydir.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
