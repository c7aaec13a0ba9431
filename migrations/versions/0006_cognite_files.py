"""cognite files: uploaded flag, metadata, instance ids

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 06:39:37.573544
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite (the embedded default) alters a column by copying the table.
    with op.batch_alter_table('files') as batch:
        batch.add_column(sa.Column('uploaded', sa.Boolean(), server_default=sa.text('true'), nullable=False))
        batch.add_column(sa.Column('uploaded_time', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('last_updated_time', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('file_metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True))
        batch.add_column(sa.Column('instance_space', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('instance_external_id', sa.String(length=255), nullable=True))
        batch.alter_column('mime_type', existing_type=sa.VARCHAR(length=32), type_=sa.String(length=255), nullable=True)
        batch.alter_column('size', existing_type=sa.BIGINT(), nullable=True)
        batch.alter_column('width', existing_type=sa.INTEGER(), nullable=True)
        batch.alter_column('height', existing_type=sa.INTEGER(), nullable=True)
        batch.alter_column('sha256', existing_type=sa.VARCHAR(length=64), nullable=True)
        batch.create_unique_constraint(batch.f('uq_files_project_id_instance_space_instance_external_id'), ['project_id', 'instance_space', 'instance_external_id'])
    # Every file before this revision was uploaded whole at creation.
    op.execute('UPDATE files SET uploaded_time = created_time, last_updated_time = created_time')


def downgrade() -> None:
    # Files whose bytes never arrived cannot exist in the older schema.
    op.execute('DELETE FROM files WHERE NOT uploaded')
    with op.batch_alter_table('files') as batch:
        batch.drop_constraint(batch.f('uq_files_project_id_instance_space_instance_external_id'), type_='unique')
        batch.alter_column('sha256', existing_type=sa.VARCHAR(length=64), nullable=False)
        batch.alter_column('height', existing_type=sa.INTEGER(), nullable=False)
        batch.alter_column('width', existing_type=sa.INTEGER(), nullable=False)
        batch.alter_column('size', existing_type=sa.BIGINT(), nullable=False)
        batch.alter_column('mime_type', existing_type=sa.String(length=255), type_=sa.VARCHAR(length=32), nullable=False)
        batch.drop_column('instance_external_id')
        batch.drop_column('instance_space')
        batch.drop_column('file_metadata')
        batch.drop_column('last_updated_time')
        batch.drop_column('uploaded_time')
        batch.drop_column('uploaded')
