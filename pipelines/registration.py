"""`python -m pipelines.registration`: the `vitae register` job as a `ray job submit` entrypoint (see `pipelines.model_registry.registration`)."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
