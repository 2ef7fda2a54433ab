"""Exceptions of the devices layer.

``DeviceError`` is the root; the hub catches it at its boundary and translates it into an offline or fault
state, or into an API error.  Drivers raise the subclasses below and chain the transport's own exception
(``raise DeviceUnreachable(...) from err``) so the cause is kept in logs.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Root of every error raised by drivers and the device model."""


class DeviceUnreachable(DeviceError):
    """The module did not answer: connection refused, reset or timed out."""


class ProtocolError(DeviceError):
    """The module answered with something that does not follow its protocol (short reply, wrong marker,
    invalid scale factor, malformed JSON).  The message says what was wrong."""


class NotSupported(DeviceError):
    """During ``probe``: the address does not speak this driver's protocol.  Also raised by ``apply`` for a
    setpoint the module kind cannot take."""


class CommandRejected(DeviceError):
    """The module refused a setpoint (out of range, not allowed in its state)."""


class AuthenticationFailed(DeviceError):
    """The module refused our credentials, or could not prove its identity."""
