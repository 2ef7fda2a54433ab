"""ORES devices: the domain model, the drivers that speak each module protocol, and simulated modules.

Layers, bottom up: ``devices.model`` (what a module is and measures, the sign convention),
``devices.drivers`` (one plugin per wire protocol behind the small ``Driver`` interface), and
``devices.sim`` (a physically consistent simulated home whose modules are real network endpoints).
"""
