"""``onnxforge tune``: search pass settings for the accuracy-speed trade-off and show the Pareto front.

- :mod:`.space`: the search space (defaults, or a TOML file) and candidates as pipeline strings;
- :mod:`.evaluate`: build a candidate, score it on evaluation data, time it against the original;
- :mod:`.budget`: tune's own metric and search data handed to a budgeted ``quantize-int8``
  (mixed-precision int8 candidates), and the decision records that replay them;
- :mod:`.cache`: results on disk, keyed by model, pipeline, data and settings (resume for free);
- :mod:`.search`: grid or Optuna (TPE / NSGA-II, multi-objective, constrained), parallel workers,
  the Pareto front and the choice;
- :mod:`.report`: the table, ``pareto.png`` and ``tune.json``;
- :mod:`.sensitivity`: per-layer accuracy impact of pruning / quantizing one layer alone.
"""

from onnxforge.tune.space import Space, default_space, load_space

__all__ = ["Space", "default_space", "load_space"]
