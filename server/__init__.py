"""The operator side: orchestration, aggregation, fusion, evaluation, run record."""
