"""Signed firmware images for ORES modules.

``firmware.manifest`` defines the release format (an opaque image, a JSON manifest describing it, and a
detached Ed25519 signature over the manifest's canonical bytes; see ``docs/firmware.md``), semantic versions
and the ``FirmwareError`` family of rejection reasons.  ``firmware.verify`` checks a release against the
trusted vendor keys and its target (signature, vendor, model, minimum hub version, anti-rollback) and the image
against its manifest (size, SHA-256) in streaming, constant memory.  ``firmware.tool`` is the vendors'
``ores-firmware`` command (keygen, sign, verify).  The rollout to modules (canary first, health check,
rollback) builds on these.
"""
