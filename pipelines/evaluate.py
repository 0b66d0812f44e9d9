"""`python -m pipelines.evaluate`: the `vitae evaluate` job as a `ray job submit` entrypoint (see `pipelines.model_registry.evaluation`)."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
