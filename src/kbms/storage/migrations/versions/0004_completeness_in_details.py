"""completeness in every stored detail

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Frozen: it imports nothing of kbms. The detail (the read model, served as stored) gained a last field,
``completeness``. A conversation stored before it has no count from its provider (no payload was read for one) and
counts its messages, exactly what kbms renders for such a conversation today; ``kbms reprocess`` reads the counts
its payloads carried. The detail is compact JSON ending in ``}``, so the field is spliced in before that brace:
the same bytes a fresh render writes, on both engines, without a JSON function either would spell differently.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Only where it is missing: the downgrade keeps the field, and an upgrade after it must not add it twice. The
    # key, quotes unescaped, can only be the field itself: a quote inside a JSON string is written \".
    splice = sa.text(
        "UPDATE conversations SET detail = substr(detail, 1, length(detail) - 1)"
        " || :head || CAST(message_count AS TEXT) || :tail"
        " WHERE detail NOT LIKE :present"
    ).bindparams(
        head=',"completeness":{"provider_count":null,"stored_count":',
        tail=',"truncated":false}}',
        present='%,"completeness":{%',
    )
    op.execute(splice)


def downgrade() -> None:
    # Nothing to undo: the model's fields are only ever added, so the kbms of 0003 serves a detail with one more
    # field as it is, and rewrites it without the field whenever the conversation changes. Cutting it off here
    # would need its stored count, which is not in any column for a conversation counted in items.
    pass
