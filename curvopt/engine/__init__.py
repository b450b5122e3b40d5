"""The product engine: which tensors form a layer, the state a model is probed in, probe vectors,
and the Hessian / Gauss-Newton vector products of a mini-batch loss.

``layers`` (blocks) → ``context`` (probing state, restored on exit) → ``probes`` → ``products``
(Hz, Gz per probe; strategies) → ``operator`` (H and G as an operator with layer restriction).
Imports only torch and the standard library: nothing above it in curvopt.
"""
