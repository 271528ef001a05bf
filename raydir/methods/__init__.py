"""The DIR methods after the 2021 paper, each a term of the training objective
(:mod:`raydir.objectives`): importing this package registers them.

* :mod:`~raydir.methods.balanced_mse`: Balanced MSE (BMC / GAI / BNI), ``loss.name``;
* :mod:`~raydir.methods.ranksim`: RankSim, ``ranksim.*``;
* :mod:`~raydir.methods.conr`: ConR, ``conr.*``;
* :mod:`~raydir.methods.srl`: SRL, ``srl.*``;
* :mod:`~raydir.methods.denseweight`: DenseWeight re-weighting, ``reweight.scheme: dense``
  (per-sample weights, not a term).
"""

from raydir.methods import balanced_mse, conr, denseweight, ranksim, srl  # noqa: F401  (registration)
