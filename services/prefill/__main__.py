"""`python -m thunderserve.prefill`: a replica that starts in the prefill phase."""

from thunderserve.common.replica import main

if __name__ == "__main__":
    raise SystemExit(main("prefill"))
