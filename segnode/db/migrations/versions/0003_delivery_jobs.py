"""jobs also deliver results: kind, destination, parent job

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='segment'))
        batch_op.add_column(sa.Column('destination', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('parent_job', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('parent_job')
        batch_op.drop_column('destination')
        batch_op.drop_column('kind')
