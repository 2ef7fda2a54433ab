"""The hub's modules as Matter bridged devices: a supervised matter.js process driven over JSON lines.

``protocol`` is the message layer of the channel, ``process`` runs and supervises the Node.js bridge,
``mapping`` turns a module and its telemetry into Matter endpoint values, and ``service`` ties them to the hub
(registry and telemetry in, On/Off commands out through the hub's control path).  See docs/matter.md.
"""
