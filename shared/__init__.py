"""Code both sides import: hospitals (``client``) and the operator (``server``) run it alike.

What lives here: the config schema (``config``), the site data contract and its checker
(``cohort*``), the network registry and what both sides know about a run's networks (``models``),
how weights and statistics travel in Flower records (``records``), the federated statistics engine
(``stats/``, ``queries``), the fusion SVM (``fusion``), certificates (``certs``), Flower process
helpers (``flower``) and the command-line building blocks (``cli``). It imports no other package
of the project, and everything but ``records``/``flower`` is importable without Flower.
"""
