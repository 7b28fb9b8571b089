"""The operator side: what runs on the consortium operator's machine; nothing here runs at a hospital.

``cli`` (``rectalfl certs | server start | run | report``), ``deploy`` (flower-superlink and runs),
``server_app`` and ``pipeline`` (the ServerApp and the stages in order), ``orchestrator``
(messages, aggregation, checkpoints, resume), ``evaluation`` and ``analysis`` (AUCs, fusion models
and tables from federated statistics), ``report`` and ``summary`` (what the operator reads),
``store*`` (the run record, SQLite). Imports ``shared`` only: it never sees a site's data.
"""
