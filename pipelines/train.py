"""`python -m pipelines.train`: the `vitae train` job as a `ray job submit` entrypoint (see `pipelines.training.driver`)."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
