"""`imgpipe-notifier`: run the notifier on NOTIFIER_PORT."""

from __future__ import annotations

import logging

import uvicorn

from imgpipe.contracts.settings import Settings
from imgpipe.notifier.app import create_app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.notifier_port, log_config=None
    )


if __name__ == "__main__":
    main()
