"""The hub's modules as Matter bridged devices.

This package will own the mapping from ORES modules to Matter device types and the supervision of the
matter.js child process that runs the Matter device stack.  It is filled by issue 5; the hub core only
reserves the name.
"""
