"""Several worker processes behind one listening port (``workers = N``; README "Multi-core").

supervisor.py  starts the workers, forwards SIGTERM/SIGHUP to them, restarts one that dies
shares.py      which worker this is, and its share of the pool and client limits
control.py     each worker's Unix socket: cancels forwarded by its siblings, and what worker 0's
               admin API gathers from the others (metrics, query statistics, tenant status,
               a tenant's pause for a move, reloads)
"""
