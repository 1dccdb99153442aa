"""Conformance helpers for compressor plugins (see docs/plugins/testing.md).

Run the whole contract against a compressor class::

    from netshrink.testing import check_compressor
    check_compressor(MyCompressor)                      # raises ConformanceError on failure

or one pytest test per check::

    import pytest
    from netshrink.testing import conformance_cases

    @pytest.mark.parametrize("case", conformance_cases(MyCompressor), ids=str)
    def test_conformance(case):
        case.run()

A compressor whose defaults are slow is given fast settings where the suite is called:
``conformance_cases(MyCompressor, config={"epochs": 1})`` (the built-ins' are in
:mod:`netshrink.testing.fast_configs`).
"""

from netshrink.testing.configs import InvalidValue, check_invalid, check_roundtrip, invalid_values
from netshrink.testing.fast_configs import BUILTIN_FAST_CONFIGS, builtin_fast_config
from netshrink.testing.models import (
    TINY_MODELS,
    ConformanceAdapter,
    ensure_registered,
    model_for_type,
    tiny_model,
)
from netshrink.testing.suite import (
    ALL_CHECKS,
    ConformanceCase,
    ConformanceError,
    check_compressor,
    conformance_cases,
    effective_config,
    registered,
)

__all__ = [
    "ALL_CHECKS",
    "BUILTIN_FAST_CONFIGS",
    "TINY_MODELS",
    "ConformanceAdapter",
    "ConformanceCase",
    "ConformanceError",
    "InvalidValue",
    "builtin_fast_config",
    "check_compressor",
    "check_invalid",
    "check_roundtrip",
    "conformance_cases",
    "effective_config",
    "ensure_registered",
    "invalid_values",
    "model_for_type",
    "registered",
    "tiny_model",
]
