"""`python -m pipelines.tune`: the `vitae tune` job as a `ray job submit` entrypoint (see `pipelines.tuning.driver`)."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
