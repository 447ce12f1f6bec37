"""The data path's library code: reading sources, converting formats, checking, tokenizing, in chunks.

Nodes in ``pipelines/{ingest,validate,format}`` parse their config and call these modules.
"""
