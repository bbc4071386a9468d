"""Errors of the server-side hardware TEE providers.

They are ConfigurationErrors: when a TEE device or its collateral is missing, the fix is on
the operator's side (wrong --tee, missing device, unreachable PCCS), never on the client's.
"""

from __future__ import annotations

from blindfold.errors import ConfigurationError


class TeeUnavailable(ConfigurationError):
    """The requested TEE interface (device, configfs entry, Gramine pseudo-file) is missing
    or answered something unexpected."""


class CollateralUnavailable(ConfigurationError):
    """The verification collateral (TCB info, QE identity, CRLs) could not be fetched and no
    cached copy exists."""
