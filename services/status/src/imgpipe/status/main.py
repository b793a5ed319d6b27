"""`imgpipe-status`: run the status service with uvicorn on STATUS_PORT."""

from __future__ import annotations

from imgpipe.contracts.web import serve
from imgpipe.status.app import create_app


def main() -> None:
    serve(create_app, lambda settings: settings.status_port)


if __name__ == "__main__":
    main()
