"""Signed firmware images for ORES modules.

This package will hold the firmware manifest format, trusted vendor keys, streaming verification (signature,
hash, model, anti-rollback) and the rollout state machine (canary first, health check, rollback).  It is filled
by issue 4; the hub core only reserves the name.
"""
