"""Discovery of ORES modules on the local network.

This package will hold the mDNS browser (python-zeroconf, ``_ores._tcp.local.``) and the BLE advertisement
scanner (bleak) that find modules before they are registered.  The hub core (issue 2) registers modules by
address through ``POST /device/register``; automatic discovery and onboarding arrive with issue 3.
"""
