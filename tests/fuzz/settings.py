"""Hypothesis settings for the fuzz harnesses, chosen by ``GATEWAY_FUZZ``.

* ``ci`` (default): a fixed number of derandomized examples per harness, so the whole folder
  runs in well under a minute and a run is reproducible;
* ``long``: many random examples (``scripts/fuzz --long``; ``GATEWAY_FUZZ_EXAMPLES`` sets how
  many per harness); a crash it finds is shrunk and printed, and becomes an ``@example`` or a
  plain regression test beside the harness.

Only the harnesses here use these settings (no global ``load_profile``): the rest of the suite
keeps its own.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

MODE = os.environ.get("GATEWAY_FUZZ", "ci")
if MODE not in ("ci", "long"):
    raise RuntimeError(f"GATEWAY_FUZZ must be 'ci' or 'long', not {MODE!r}")

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def fuzz(ci_examples: int, long_examples: int = 20000) -> settings:
    """Settings for one harness: ``ci_examples`` in CI, ``long_examples`` in the long mode."""
    if MODE == "long":
        return settings(
            max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", long_examples)),
            deadline=None,
            suppress_health_check=_SLOW_OK,
            print_blob=True,
        )
    return settings(
        max_examples=ci_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=_SLOW_OK,
        print_blob=True,
    )
