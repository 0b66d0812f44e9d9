"""MLflow, owned here: the one client and its request policy, training and sweep runs, model logging, figures."""
