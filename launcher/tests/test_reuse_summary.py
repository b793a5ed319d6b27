"""What `imgpipe submit --refresh` sends, and how the CLI counts reused images."""

from __future__ import annotations

from imgpipe.launcher.cli import build_parser
from imgpipe.launcher.client import OutputOptions
from imgpipe.launcher.commands import _reused_line


def test_refresh_is_a_form_field_only_when_asked() -> None:
    assert "refresh" not in OutputOptions().form()
    assert OutputOptions(refresh=True).form()["refresh"] == "true"
    args = build_parser().parse_args(["submit", "products.csv", "--refresh"])
    assert args.refresh is True


def test_reused_images_are_counted_by_reason() -> None:
    final = {
        "progress": {"total": 1000, "ok": 1000, "failed": 0},
        "reused": {"images": 998, "not_modified": 990, "same_bytes": 8},
    }
    assert _reused_line(final) == (
        "reused: 998 of 1,000 images (990 not modified at their host, 8 same bytes)"
    )
    assert _reused_line({"progress": {"total": 3}, "reused": {"images": 0}}) is None
    assert _reused_line({"progress": {"total": 3}}) is None  # an older status service
