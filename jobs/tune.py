"""Entrypoint for `ray job submit ... -- python jobs/tune.py --config jobs/configs/tune_demo.yaml`.

Identical to `raydir tune`; inside a submitted job Ray connects to the cluster it runs on.
Re-submitting the same command resumes an interrupted sweep (set tune.storage_path to storage
every node can reach, e.g. s3://bucket/raydir, so the resubmitted driver finds it).
"""

import sys

from raydir.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
