"""`imgpipe-notifier`: run the notifier service with uvicorn on NOTIFIER_PORT."""

from __future__ import annotations

from imgpipe.contracts.web import serve
from imgpipe.notifier.app import create_app


def main() -> None:
    serve(create_app, lambda settings: settings.notifier_port)


if __name__ == "__main__":
    main()
