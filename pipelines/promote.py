"""`python -m pipelines.promote`: the `vitae promote` job as a `ray job submit` entrypoint (see `pipelines.model_registry.promotion`)."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
