"""pin each item's file version; overwrites upload beside the content; index file keys for the orphan sweep; descriptive file fields

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 08:24:23.099913
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('files', sa.Column('pending_storage_key', sa.String(length=512), nullable=True))
    op.add_column('files', sa.Column('descriptive_fields', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True))
    op.create_index('ix_files_storage_key', 'files', ['storage_key'], unique=False)
    op.create_index('ix_files_pending_storage_key', 'files', ['pending_storage_key'], unique=False)
    # Items made before this revision stay NULL: they read the file's current
    # content, as they always did.
    op.add_column('job_items', sa.Column('file_storage_key', sa.String(length=512), nullable=True))
    op.create_index(op.f('ix_job_items_file_storage_key'), 'job_items', ['file_storage_key'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_job_items_file_storage_key'), table_name='job_items')
    op.drop_column('job_items', 'file_storage_key')
    op.drop_index('ix_files_pending_storage_key', table_name='files')
    op.drop_index('ix_files_storage_key', table_name='files')
    op.drop_column('files', 'descriptive_fields')
    op.drop_column('files', 'pending_storage_key')
