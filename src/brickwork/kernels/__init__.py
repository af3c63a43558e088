"""Compiled CPU kernels (numba, :mod:`brickwork.kernels.cpu`): routing and expert computations on packed rows.

They take numpy arrays and know nothing of bricks or routers; :mod:`brickwork.bricks.paths` picks a path per
call and prepares their arguments, and a router's own file brings the preparation of its compiled routing
(``Router.fast_paths``).
"""
