"""WSGI entry point: `gunicorn wsgi:app`, `flask --app wsgi …`."""
import click

from service import health
from service.app import create_app

app = create_app()

if click.get_current_context(silent=True) is None:  # served; a `flask` command checks for itself (service/cli)
    health.refuse_to_serve(app)
