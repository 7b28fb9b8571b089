"""Simulation only: a whole consortium on one machine, which may import both sides.

``synth*`` (the synthetic multi-centre cohort), ``runner`` (``rectalfl simulate``: the federation on
Flower's simulation engine, and the pooled and local baselines that train in one process),
``reference`` (pooled references that read every simulated site's rows), ``cli`` (``synth``,
``simulate``, ``demo``) and ``benchmarks/``. Nothing here runs in a real consortium.
"""
