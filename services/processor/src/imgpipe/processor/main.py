"""`imgpipe-processor`: run the processor with uvicorn (health routes, consumers, pool)."""

from __future__ import annotations

import logging

import uvicorn

from imgpipe.contracts.settings import Settings
from imgpipe.processor.app import create_app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.processor_port)


if __name__ == "__main__":
    main()
