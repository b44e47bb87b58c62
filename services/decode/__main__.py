"""`python -m thunderserve.decode`: a replica that starts in the decode phase."""

from thunderserve.common.replica import main

if __name__ == "__main__":
    raise SystemExit(main("decode"))
