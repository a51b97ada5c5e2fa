"""The human-feedback web app: annotator pages, admin pages and the REST API (FastAPI)."""

from swarmlm.web.app import create_app
from swarmlm.web.settings import WebSettings

__all__ = ["WebSettings", "create_app"]
