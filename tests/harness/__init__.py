"""What the tests share, importable as `harness` (pytest puts tests/ on sys.path; no test module
imports another). Nothing under experiments/ imports it: what an experiment needs lives in
fedsparse (the loopback deployment: fedsparse.deploy.loopback, the in-memory grid:
fedsparse.apps.inprocess).

    harness.models      tiny models, the shipped method configs, a one-client packed strategy
    harness.federation  the tiny federation's overrides (`+experiment=smoke` and the tests' own)
    harness.replies     TRAIN replies as a client would send them
    harness.loopback    a real SuperLink and SuperNodes on 127.0.0.1, and the checks on what they ran
    harness.ray_head    a Ray head of the tests' own
    harness.compose     Docker Compose and Flower's parsers over compose files
    harness.containers  a private Docker daemon and the offline project image
    harness.fixtures    the shared pytest fixtures (registered by tests/conftest.py)
"""
