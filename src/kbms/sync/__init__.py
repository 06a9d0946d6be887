"""Pulling conversations from providers' APIs (issue 15): which sources, and the sync passes over them.

A use case, like ``kbms.ingest``: it reaches providers through ``kbms.providers.pull`` and the database through the
store's sync state (``kbms.storage.syncstate``).
"""
