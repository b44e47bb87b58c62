"""`python -m thunderserve.router`: the HTTP + NATS front end."""

from thunderserve.router.args import build_parser
from thunderserve.router.server import serve

if __name__ == "__main__":
    serve(build_parser().parse_args())
