"""`imgpipe-processor`: run the processor service with uvicorn on PROCESSOR_PORT."""

from __future__ import annotations

from imgpipe.contracts.web import serve
from imgpipe.processor.app import create_app


def main() -> None:
    serve(create_app, lambda settings: settings.processor_port)


if __name__ == "__main__":
    main()
