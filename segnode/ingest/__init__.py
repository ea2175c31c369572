"""Receiving: the DIMSE listener (scp.py, ul.py) and the store both it and STOW-RS hand instances to
(store.py), which spools them durably (spool.py), indexes and audits them before any acknowledgement."""
