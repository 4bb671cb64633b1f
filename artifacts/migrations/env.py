"""Alembic environment: Kiln always passes an open connection in `config.attributes`."""

from alembic import context

from artifacts.index.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,  # SQLite and PostgreSQL both roll DDL back; one transaction
)
with context.begin_transaction():
    context.run_migrations()
