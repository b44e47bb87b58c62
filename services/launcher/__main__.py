"""`python -m thunderserve.launcher`: the same as `thunderserve up`."""

from thunderserve.launcher.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
