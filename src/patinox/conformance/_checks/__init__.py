"""The conformance checks other than the state machine, one function each, in one module
per family by what it defends:

* :mod:`._encryption`: payloads at rest (no plaintext, ciphertexts bound to their row, one
  DEK per tenant);
* :mod:`._tenant_routes`: a tenant's answers hold only its own data;
* :mod:`._deletion`: deletion shreds and purges;
* :mod:`._context`: the tenant context across threads and processes;
* :mod:`._postgres`: pooled connections and row-level security on PostgreSQL.

Every check makes its own tenants (fresh names), works through the HTTP API where a
tenant would, and looks below Patinox (:mod:`patinox.conformance._raw`) where an
attacker with the database would. A check passes by returning and fails by raising
:class:`~patinox.conformance._deployment.ConformanceFailure`. The order they run in is
:data:`patinox.conformance.CHECKS`.
"""
