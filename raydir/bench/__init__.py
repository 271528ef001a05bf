"""`raydir bench`: suites x methods x seeds as Ray Tune trials, statistics over seeds, tables.

- :mod:`raydir.bench.stats`: per-trial metrics from the per-bin test table, summaries over seeds;
- :mod:`raydir.bench.presets`: named methods as config overrides, combinable with ``+``;
- :mod:`raydir.bench.suites`: base configs and data locations of the benchmark suites;
- :mod:`raydir.bench.tables`: Markdown / CSV tables, the published numbers beside raydir's;
- :mod:`raydir.bench.runner`: the method x seed grid on Ray Tune, one MLflow parent run.
"""
