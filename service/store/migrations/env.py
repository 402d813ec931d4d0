"""Alembic's environment: runs revisions, or autogenerates one, on the connection the caller
put in `config.attributes["connection"]` (service.store.migrations), inside its transaction."""
from alembic import context

from service.store.schema import metadata

context.configure(connection=context.config.attributes["connection"], target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
