"""`python -m moepaper.reproduce`: the main job (`make reproduce`).

The notebook pipeline is not built yet (see the open issue "The paper notebooks").
Until then this entry point says so and exits non-zero, so nobody mistakes it for a run.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "moepaper.reproduce: the notebook pipeline is not implemented yet; "
        "`make test` runs the library's tests.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
