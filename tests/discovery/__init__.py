"""Tests of the discovery layer (mDNS browser and hub advertisement, BLE scanner)."""
