"""The fleet service: devices' signed reports in, the operators' view and rollout decisions out.

``edgepack fleet serve`` runs the service (a Starlette app on uvicorn) over a store
(:mod:`edgepack.fleet.store`: SQLite by default, PostgreSQL for production).
Needs the ``fleet`` extra; nothing under ``device_agent`` imports this package.
"""
