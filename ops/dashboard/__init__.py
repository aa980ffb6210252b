"""The web dashboard: ``create_app(stream_settings, app_settings)`` (see :mod:`.app`)."""

from ops.dashboard.app import create_app

__all__ = ["create_app"]
