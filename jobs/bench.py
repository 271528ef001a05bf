"""Entrypoint for `ray job submit ... -- python jobs/bench.py --suite synthetic --seeds 5`.

Identical to `raydir bench`; inside a submitted job Ray connects to the cluster it runs on, and
the trials spread over its nodes. Re-submitting the same command resumes an interrupted bench
(set train.storage_path to storage every node can reach, e.g. s3://bucket/raydir).
"""

import sys

from raydir.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
