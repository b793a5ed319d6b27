"""`imgpipe-ingest`: run the ingest service with uvicorn on INGEST_PORT."""

from __future__ import annotations

from imgpipe.contracts.web import serve
from imgpipe.ingest.app import create_app


def main() -> None:
    serve(create_app, lambda settings: settings.ingest_port)


if __name__ == "__main__":
    main()
