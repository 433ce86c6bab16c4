"""Artefact input and output, one concern a module:

- atomic.py   every write through a temp file and a rename (JSON, safetensors, torch checkpoints)
- weights.py  reading weights back, checked (readable, finite, the fingerprint a record vouches for)
- locks.py    advisory file locks between the jobs of a sweep and runs sharing a directory
- hashing.py  content fingerprints of state dicts and hashes of settings
- reuse.py    the one rule deciding whether a stored artefact is reused
"""
