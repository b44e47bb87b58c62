"""`python -m thunderserve.colocated`: a replica that starts serving both phases (prefill and decode)."""

from thunderserve.common.replica import main

if __name__ == "__main__":
    raise SystemExit(main("colocated"))
