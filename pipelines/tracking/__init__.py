"""MLflow, owned here: the client and its request policy, the runs, the figures."""
