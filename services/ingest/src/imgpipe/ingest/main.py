"""`imgpipe-ingest`: run the ingest service with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from imgpipe.contracts.settings import Settings
from imgpipe.ingest.app import create_app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.ingest_port)


if __name__ == "__main__":
    main()
