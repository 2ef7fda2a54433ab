"""Simulated ORES modules: a physically consistent home whose modules are real endpoints on loopback.

``devices.sim.base`` defines what a simulated module offers to an endpoint (``SimulatedModule``);
``devices.sim.physics`` models PV, battery, household load and grid meter on one clock;
``devices.sim.sunspec_server`` and ``devices.sim.ores_http_server`` put a module on the network, speaking
SunSpec Modbus TCP (pymodbus) or ORES-HTTP (aiohttp); ``devices.sim.home`` assembles the demo home.
"""
