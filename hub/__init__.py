"""The ORES Hub service: the Central Control Unit.

``hub.app`` builds the aiohttp application; ``hub.api`` holds the REST endpoints and their schemas;
``hub.auth`` pairing and tokens; ``hub.registry`` the registered modules (tinydb, atomic);
``hub.poller`` drives every module's driver with timeouts, retries and offline detection; ``hub.state`` is the
live model and event bus; ``hub.control`` arbitrates setpoints (API > schedule > default) and rewrites them
cyclically; ``hub.history`` stores telemetry as time series (SQLite, WAL).
"""

__version__ = "0.1.0"
